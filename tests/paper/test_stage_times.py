"""slim.paper.stage_times: reproduce.sh's stage times summed over the invocations of one command, and the cost of
one model's stages against another's."""

import pytest

from slim.paper.stage_times import cost_table, read_ledger, total

CMD = 'MODEL="m" bash reproduce.sh'


def _line(invocation, stage, title, seconds, status="complete", command=CMD):
    return "\t".join([str(invocation), "2026-12-03T10:00:00Z", stage, title, str(seconds), status, command])


def test_a_resumed_run_sums_its_invocations_and_other_commands_are_left_out(tmp_path):
    ledger = tmp_path / "stage_seconds_m.tsv"
    lines = [
        _line(1, "1/8", "the pipeline", 100),
        _line(1, "2/8", "Linear-AcT", 40, "interrupted"),  # stopped mid-stage
        _line(2, "1/8", "the pipeline", 3),  # read back
        _line(2, "2/8", "Linear-AcT", 25),
        _line(3, "1/8", "the pipeline", 999, command='MODEL="m" KAPPAS="5" bash reproduce.sh'),  # another command
    ]
    ledger.write_text("\n".join(lines) + "\n\n")
    stages = read_ledger(ledger, CMD)
    assert list(stages) == ["1/8", "2/8"]
    assert stages["1/8"] == {"title": "the pipeline", "seconds": 103.0, "invocations": 2, "complete": True}
    assert stages["2/8"] == {"title": "Linear-AcT", "seconds": 65.0, "invocations": 2, "complete": True}
    assert total(stages) == (168.0, 2)
    assert read_ledger(tmp_path / "absent.tsv", CMD) == {} and total({}) == (0, 0)


def test_a_damaged_line_is_one_line_naming_the_file(tmp_path):
    ledger = tmp_path / "stage_seconds_m.tsv"
    ledger.write_text(_line(1, "1/8", "the pipeline", 100) + "\n" + "1\t2\t1/8\tx\tnot-a-number\tcomplete\tc\n")
    with pytest.raises(ValueError, match=r"line 2 is not a stage time"):
        read_ledger(ledger, CMD)
    ledger.write_text("1\t2\t3\n")
    with pytest.raises(ValueError, match=r"line 1 is not a stage time"):
        read_ledger(ledger, CMD)


def test_cost_table_gives_each_stage_its_ratio_and_marks_those_over_the_limit():
    a = {"1/8": {"title": "the pipeline", "seconds": 100.0, "invocations": 1, "complete": True},
         "2/8": {"title": "Linear-AcT", "seconds": 50.0, "invocations": 1, "complete": True}}  # fmt: skip
    b = {"1/8": {"title": "the pipeline", "seconds": 200.0, "invocations": 1, "complete": True},
         "2/8": {"title": "Linear-AcT", "seconds": 150.0, "invocations": 2, "complete": False}}  # fmt: skip
    rows = cost_table({"a": a, "b": b}, limit=2.5).splitlines()
    assert rows[0] == "| stage | a (s) | b (s) | b / a |"
    assert rows[2] == "| 1/8 the pipeline | 100 | 200 | 2.00x |"
    assert rows[3] == "| 2/8 Linear-AcT | 50 | 150 (unfinished) | 3.00x (over 2.5x) |"
    assert rows[4] == "| all | 150 | 350 | 2.33x |"
    assert cost_table({"a": {}, "b": {}}) == ""
    # a stage one model has not run
    rows = cost_table({"a": a, "b": {"1/8": b["1/8"]}}).splitlines()
    assert rows[3] == "| 2/8 Linear-AcT | 50 | - | - |"

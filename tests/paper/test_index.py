"""The README's generated section (slim.paper.index) is short: Table 1's headline from its file, links to the rest;
with several models, each model's run and Table 1 across them."""

import json

import pytest
from test_across_models import write_model_run  # one model's run as reproduce.sh leaves it

from slim.paper.index import (
    BEGIN,
    END,
    main,
    models_section,
    results_section,
    table1_summary,
    update_readme,
    write_models_index,
)

TABLE1 = """### Table 1: m, 2 folds

| method | setting | folds | questions | True*Info | True % | Info % | SEM |
| --- | --- | --- | --- | --- | --- | --- | --- |
| baseline | - | 2 | 8 | 22.4 | 37.1 | 60.3 | 0.392 |
| slim | kappa = 40 | 2 | 8 | 22.2 | 51.7 | 43.2 | 0.455 |

Pooled over folds, with 95 % bootstrap intervals over questions (BCa, 9,999 resamples):

| method | setting | questions | True*Info | True % | Info % |
| --- | --- | --- | --- | --- | --- |
| baseline | - | 8 | 22.4 (20.5 to 24.3) | 37.1 (33.8 to 40.4) | 60.3 (57.0 to 63.6) |
| slim | kappa = 40 | 8 | 22.3 (20.5 to 24.2) | 51.7 (48.2 to 55.1) | 43.2 (39.9 to 46.5) |

Change from the unintervened model on the same questions (points; p two-sided):

| method | setting | fold | questions | True*Info | p (True*Info) | True % | Info % |
| --- | --- | --- | --- | --- | --- | --- | --- |
| slim | kappa = 40 | 0 | 4 | +0.7 (-2.0 to +3.5) | 0.611 | +12.0 (+7.3 to +16.6) | -13.9 (-18.3 to -9.5) |
| slim | kappa = 40 | pooled | 8 | -0.1 (-2.1 to +2.1) | 0.964 | +14.6 (+11.1 to +18.0) | -17.1 (-20.6 to -13.7) |

Judges: truth `offline@sha256:85aa`, info `offline@sha256:a199`.

Produced 2026-11-30 by `bash reproduce.sh`.
"""


def test_table1_summary_keeps_the_pooled_rows_and_the_judges():
    out = table1_summary(TABLE1)
    assert "| slim | kappa = 40 | 8 | 22.3 (20.5 to 24.2) |" in out
    assert "| slim | kappa = 40 | pooled | 8 | -0.1 (-2.1 to +2.1) |" in out
    assert "| slim | kappa = 40 | 0 | 4 |" not in out  # per-fold rows stay in the file
    assert "| 0.455 |" not in out  # so does the wide table
    assert out.splitlines()[-1] == "Judges: truth `offline@sha256:85aa`, info `offline@sha256:a199`."


def test_results_section_links_every_artefact_and_inlines_table1(tmp_path):
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "table1_m_full.md").write_text(TABLE1)
    artefacts = [
        {"name": "Table 1", "path": str(paper / "table1_m_full.md"), "what": "the methods", "exists": True},
        {"name": "Table 2", "path": str(paper / "table2_m_full.md"), "what": "the arms", "exists": False},
    ]
    record = {"command": "FULL=1 bash reproduce.sh", "date": "2026-11-30", "seconds": 65.0, "machine": "x"}
    (paper / "index_m_full.json").write_text(json.dumps({**record, "artefacts": artefacts}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# P\n\n{BEGIN}\nold\n{END}\n")
    update_readme(readme, results_section(paper, "m", "full", readme))
    section = readme.read_text().split(BEGIN)[1].split(END)[0]
    assert "not the paper's 7B" in section and "1 min 05 s wall time" in section
    assert "| slim | kappa = 40 | pooled |" in section and "| 0.455 |" not in section
    assert "- Table 1: the methods: [table1_m_full.md](paper/table1_m_full.md)" in section
    assert "- Table 2: the arms: not written by this run" in section


def test_the_index_and_the_readme_cover_every_model_run(tmp_path):
    summaries, _ = write_model_run(tmp_path, "model_a", 0, "judge_a", 24, stage_seconds={"1/8": 100, "2/8": 20})
    write_model_run(tmp_path, "model_b", 1, "judge_b", 6, stage_seconds={"1/8": 300, "2/8": 40})
    paper = tmp_path / "paper"
    # each model's own index names Table 1's summaries and ITI's K with its rule
    own = json.loads((paper / "index_model_a_quick.json").read_text())
    assert own["table1_summaries"] == summaries and own["iti_num_heads"] == {"k": 24, "rule": "smollm2_share"}
    assert "ITI's K = 24 heads (rule smollm2_share)" in (paper / "index_model_a_quick.md").read_text()
    (paper / "table2_model_b_quick.md").write_text("Table 2")
    out, record = write_models_index(paper, ["model_a", "model_b"], "quick", 'MODELS="model_a model_b" bash x', 130)
    assert out.name == "index_models_quick.md" and (paper / "index_models_quick.json").exists()
    assert (
        record["combined_table"] == str(paper / "table1_models_quick.md")
        and (paper / "table1_models_quick.md").exists()
    )
    assert [r["model"] for r in record["runs"]] == ["model_a", "model_b"]
    assert record["runs"][1]["judges"] == "Judges: truth `judge_b@truth`, info `judge_b@info`."
    index = out.read_text()
    assert "[table1_models_quick.md](table1_models_quick.md)" in index and "in 2 min 10 s" in index
    # each model's wall time is its stages' seconds summed over its invocations; each stage's cost against model_a
    assert "| model_b | 5 min 40 s over 1 invocation(s) | " in index
    assert "| 6 (smollm2_share) | truth `judge_b@truth`" in index
    assert (
        "| 1/8 stage 1/8 | 100 | 300 | 3.00x (over 2.5x) |" in index
        and "| all | 120 | 340 | 2.83x (over 2.5x) |" in index
    )
    assert record["runs"][0]["stage_seconds"]["2/8"]["seconds"] == 20
    assert (
        "[index_model_b_quick.md](index_model_b_quick.md) | [table1_model_b_quick.md](table1_model_b_quick.md) |"
        in index
    )

    # model_a's full run on record: the section names it beside the quick one
    full = json.loads((paper / "index_model_a_quick.json").read_text())
    (paper / "index_model_a_full.json").write_text(json.dumps({**full, "mode": "full", "command": "FULL=1 x"}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# P\n\n{BEGIN}\nold\n{END}\n")
    update_readme(readme, models_section(paper, "quick", readme))
    section = readme.read_text().split(BEGIN)[1].split(END)[0]
    assert section.count("not the paper's 7B") == 1 and '`MODELS="model_a model_b" bash x`' in section
    assert "[table1_models_quick.md](paper/table1_models_quick.md)" in section
    for model, k in (("model_a", 24), ("model_b", 6)):
        # each model: its command, date, wall time and K; its Table 1 headline with its judges; its artefacts
        assert f"**{model}**: `MODEL={model} bash reproduce.sh`, " in section and f"ITI's K = {k} heads" in section
        assert f"Judges: truth `judge_{model[-1]}@truth`" in section
        assert f"[Table 1](paper/table1_{model}_quick.md)" in section
    assert (
        section.count("| slim | kappa = 40 | pooled | 160 |") == 2 and "| slim | kappa = 40 | 0 | 80 |" not in section
    )
    assert (
        "[Table 2](paper/table2_model_b_quick.md)" in section
        and "not written: Table 2, Against ITI, Table 3" in section
    )
    assert (
        "**model_a**: `MODEL=model_a bash reproduce.sh`, " in section and "2 min 00 s over 1 invocation(s)" in section
    )
    assert "Its full run: `FULL=1 x`, " in section and section.count("Its full run") == 1
    # with its wall time and its Table 1 (here the quick run's file, which the copied record names)
    full_line = "2 min 00 s over 1 invocation(s) wall time ([index_model_a_full.md](paper/index_model_a_full.md), "
    assert full_line in section
    assert "[table1_model_a_quick.md](paper/table1_model_a_quick.md))." in section
    assert "**Cost per stage.**" in section and "| 2/8 stage 2/8 | 20 | 40 | 2.00x |" in section

    # the command: --readme_only rewrites the section from the indexes; a run without them is one line
    readme.write_text(f"# P\n\n{BEGIN}\nold\n{END}\n")
    flags = ["--paper_dir", str(paper), "--models", "model_a", "model_b", "--mode", "quick", "--readme", str(readme)]
    main([*flags, "--readme_only"])
    assert readme.read_text().split(BEGIN)[1].split(END)[0] == section
    with pytest.raises(ValueError, match=r"index_models_full.json is missing: run `MODELS=\.\.\. bash reproduce.sh`"):
        models_section(paper, "full", readme)


def test_models_run_one_command_each_sum_their_wall_times(tmp_path):
    write_model_run(tmp_path, "model_a", 0, "judge_a", 24, stage_seconds={"1/8": 100, "2/8": 20})
    write_model_run(tmp_path, "model_b", 1, "judge_b", 6)  # no ledger: its last invocation's 65 s
    paper = tmp_path / "paper"
    out, record = write_models_index(paper, ["model_a", "model_b"], "quick")
    assert record["command"] is None and record["seconds"] == 120 + 65
    assert "from each model's own run (its command below; 3 min 05 s in all, summed over them)" in out.read_text()
    assert "Produced" in (paper / "table1_models_quick.md").read_text()
    readme = tmp_path / "README.md"
    readme.write_text(f"# P\n\n{BEGIN}\nold\n{END}\n")
    main(["--paper_dir", str(paper), "--models", "model_a", "model_b", "--mode", "quick", "--readme", str(readme)])
    section = readme.read_text().split(BEGIN)[1].split(END)[0]
    assert "from each model's own run on " in section and "3 min 05 s wall time in all, summed," in section
    assert "**model_b**: `MODEL=model_b bash reproduce.sh`, " in section and "None" not in section
    # one of the two is a mistake, not a guess
    with pytest.raises(SystemExit):
        main(["--paper_dir", str(paper), "--models", "model_a", "model_b", "--mode", "quick", "--seconds", "9"])

"""Table 1 across models (slim.paper.across_models): each model's rows as a group, every value with its interval and
every change paired against that model's own unintervened answers, as slim.evaluation.reports computes them."""

import json
import os
import re

import numpy as np
import pytest
from test_figures import _summary  # the summaries (with scored answers) the paper tests write

from slim.evaluation.reports import interval_cell, interval_table
from slim.evaluation.reports import main as report
from slim.paper.across_models import combined_table, write_combined
from slim.paper.index import write_index

METHODS = [("baseline", {}), ("iti", {"alpha": 5.0}), ("slim", {"kappa": 40.0}), ("mimic", {}), ("linear_act", {})]


def _verdicts(rng, n=80):
    """Per method, per fold: (true, info) of n questions; the methods move the unintervened answers."""
    base = {f: (rng.random(n) < 0.35, rng.random(n) < 0.75) for f in (0, 1)}
    out = {"baseline": base}
    for method, more_true, less_info in (("iti", 0.1, 0.05), ("slim", 0.35, 0.3), ("mimic", 0.05, 0.0)):
        out[method] = {
            f: (t | (rng.random(n) < more_true), i & (rng.random(n) >= less_info)) for f, (t, i) in base.items()
        }
    out["linear_act"] = base
    return out


def _stamp(path, **fields):
    """Add fields to every row of a summary (judges' identities, MC1 / MC2), as the scripts record them."""
    rows = [dict(r, **fields) for r in json.loads(path.read_text())]
    path.write_text(json.dumps(rows))


def write_model_run(root, model, seed, judge, k, extra=None, stage_seconds=None):
    """One model's run as reproduce.sh leaves it: Table 1's five summaries (scored answers beside them), its Table 1
    file and its index naming the summaries, ITI's K and, given `stage_seconds` ({"1/8": seconds, ...}), its stage
    ledger's times. Returns the summaries and the verdicts."""
    command = f"MODEL={model} bash reproduce.sh"
    ledger = None
    if stage_seconds:
        ledger = root / "validation" / f"stage_seconds_{model}.tsv"
        ledger.parent.mkdir(parents=True, exist_ok=True)
        rows = [f"1\t2026-12-03T10:00:00Z\t{k}\tstage {k}\t{v}\tcomplete\t{command}" for k, v in stage_seconds.items()]
        ledger.write_text("\n".join(rows) + "\n")
    verdicts = _verdicts(np.random.default_rng(seed))
    paper = root / "paper"
    summaries = []
    for method, knob in METHODS:
        path = _summary(
            root / "validation" / model,
            method,
            {**knob, **({"strength": 0.5} if method == "linear_act" else {})},
            verdicts[method],
        )
        _stamp(path, judge_id=f"{judge}@truth", info_judge_id=f"{judge}@info", **(extra or {}))
        summaries.append(str(path))
    report([*summaries, "--out", str(paper / f"table1_{model}_quick.md"), "--title", f"Table 1: {model}"])
    write_index(
        paper,
        model,
        "quick",
        f"{model}_first40",
        command,
        65.0,
        summaries,
        k,
        "smollm2_share",
        ledger,
    )
    return summaries, verdicts


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("across")
    a = write_model_run(root, "model_a", 0, "judge_a", 24, extra={"mc1": 0.25, "mc2": 0.5})
    b = write_model_run(root, "model_b", 1, "judge_b", 6)
    return root, a, b


def _rows(text):
    """The combined table's rows as lists of cells, the model carried down its group."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows, model = [], None
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        model = cells[0].strip("*") or model
        rows.append(dict(zip(header, [model, *cells[1:]])))
    return rows


def _interval(cell):
    v, lo, hi = (float(x) for x in re.match(r"([-+\d.]+) \(([-+\d.]+) to ([-+\d.]+)\)", cell).groups())
    return v, lo, hi


def _pooled(verdicts, method):
    return [np.concatenate([verdicts[method][f][j] for f in (0, 1)]).astype(float) for j in (0, 1)]


def test_each_model_is_a_group_of_the_papers_rows(two_models):
    root, _, _ = two_models
    rows = _rows(combined_table(root / "paper", ["model_a", "model_b"], "quick"))
    names = ["unintervened", "ITI", "SLIM", "MiMiC", "Linear-AcT"]
    assert [(r["model"], r["method"]) for r in rows] == [(m, n) for m in ("model_a", "model_b") for n in names]
    assert all(r["questions"] == "160" for r in rows)
    # the unintervened rows have no change; every other row has one for each of the three measures
    assert all(r[f"change {c}"] == "-" for r in rows if r["method"] == "unintervened" for c in ("True %", "Info %"))
    assert all(r["change True*Info"].startswith(("+", "-")) and " to " in r["change True*Info"] for r in rows[1:5])
    # MC1 / MC2 where measured (model_a), "-" where not; CE / KL measured by neither: no column
    assert [r["MC1"] for r in rows] == ["0.250"] * 5 + ["-"] * 5 and "CE" not in rows[0]


def test_a_value_and_its_interval_against_an_independent_computation(two_models):
    root, _, (summaries_b, verdicts_b) = two_models
    rows = {
        (r["model"], r["method"]): r for r in _rows(combined_table(root / "paper", ["model_a", "model_b"], "quick"))
    }
    slim = rows[("model_b", "SLIM")]
    t, i = _pooled(verdicts_b, "slim")
    v, lo, hi = _interval(slim["True %"])
    assert v == pytest.approx(100 * t.mean(), abs=0.05)
    draws = np.random.default_rng(7).integers(0, len(t), (20000, len(t)))  # a hand percentile bootstrap
    np.testing.assert_allclose((lo, hi), np.percentile(100 * t[draws].mean(1), [2.5, 97.5]), atol=1.5)
    assert _interval(slim["True*Info"])[0] == pytest.approx(100 * t.mean() * i.mean(), abs=0.05)
    # the cell is reports' own interval, not one computed differently
    own = interval_table([summaries_b[2]]).iloc[0]
    assert slim["True*Info"] == interval_cell(own["true_info"]) and slim["Info %"] == interval_cell(own["info"])


def test_a_change_is_paired_against_that_models_own_unintervened_answers(two_models):
    root, (_, verdicts_a), (_, verdicts_b) = two_models
    rows = {
        (r["model"], r["method"]): r for r in _rows(combined_table(root / "paper", ["model_a", "model_b"], "quick"))
    }
    for model, verdicts in (("model_a", verdicts_a), ("model_b", verdicts_b)):
        (tb, _), (tm, _) = _pooled(verdicts, "baseline"), _pooled(verdicts, "slim")
        d, lo, hi = _interval(rows[(model, "SLIM")]["change True %"])
        assert d == pytest.approx(100 * (tm.mean() - tb.mean()), abs=0.05)
        draws = np.random.default_rng(8).integers(0, len(tb), (20000, len(tb)))  # the same questions in both
        hand = np.percentile(100 * (tm[draws].mean(1) - tb[draws].mean(1)), [2.5, 97.5])
        np.testing.assert_allclose((lo, hi), hand, atol=1.5)
    # Linear-AcT answered exactly as the unintervened model here: no change, and an interval of nothing
    assert rows[("model_b", "Linear-AcT")]["change True %"] == "+0.0 (+0.0 to +0.0)"


def test_the_judges_and_k_are_named_per_model_and_a_missing_index_is_one_line(two_models, tmp_path):
    root, _, _ = two_models
    out = write_combined(root / "paper", ["model_a", "model_b"], "quick", command="MODELS=... bash reproduce.sh")
    text = out.read_text()
    assert out.name == "table1_models_quick.md"
    assert "- model_a: Judges: truth `judge_a@truth`, info `judge_a@info`. ITI's K = 24 heads" in text
    assert "- model_b: Judges: truth `judge_b@truth`, info `judge_b@info`. ITI's K = 6 heads" in text
    assert "by `MODELS=... bash reproduce.sh`" in text
    with pytest.raises(ValueError, match="index_model_c_quick.json is missing: run `MODEL=model_c bash reproduce.sh`"):
        combined_table(root / "paper", ["model_a", "model_c"], "quick")
    old = tmp_path / "index_old_quick.json"  # an index written before the summaries were recorded
    old.write_text(json.dumps({"model": "old", "artefacts": []}))
    with pytest.raises(ValueError, match="names no Table 1 summaries"):
        combined_table(tmp_path, ["old"], "quick")
    # a run whose scored answers are gone (another machine's) is refused, not shown as dashes
    summaries, _ = write_model_run(tmp_path, "model_c", 2, "judge_c", 6)
    gone = json.loads(open(summaries[1]).read())[0]["scored_answers"]
    os.remove(gone)
    with pytest.raises(ValueError, match=f"names scored answers that are not on this machine \\({re.escape(gone)}\\)"):
        combined_table(tmp_path / "paper", ["model_c"], "quick")

"""slim.judges.check: the verdicts stored in a run's scored answers against labels of the same answers, per method,
and each method's change from the unintervened answers by labels and by judges."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from slim.judges.check import check_markdown, labelled_verdicts, main

N = 40  # questions per fold


def _run(root, method, knob, truth_p, info_p, answers):
    """A summary with two folds' scored answers: question i of fold f is "q{f}-{i}"."""
    rows = []
    for f in (0, 1):
        path = root / f"{method}_fold{f}_scored.csv"
        pd.DataFrame({
            "question_idx": range(N), "question": [f"  q{f}-{i} " for i in range(N)],
            "answer": [f" {answers[f][i]} " for i in range(N)],
            "truth_score": truth_p[f], "info_score": info_p[f],
        }).to_csv(path, index=False)  # fmt: skip
        rows.append({"method": method, "fold": f, **knob, "scored_answers": str(path),
                     "judge_id": "t@1", "info_judge_id": "i@2"})  # fmt: skip
    rows.append({"method": method, "fold": "mean", **knob})
    summary = root / f"{method}.json"
    summary.write_text(json.dumps(rows))
    return summary


@pytest.fixture()
def runs(tmp_path):
    rng = np.random.default_rng(0)
    base_answers = {f: [f"base answer {i}" for i in range(N)] for f in (0, 1)}
    iti_answers = {f: [f"iti answer {i}" if i % 2 else f"base answer {i}" for i in range(N)] for f in (0, 1)}
    p = {k: {f: rng.random(N) for f in (0, 1)} for k in ("bt", "bi", "it", "ii")}
    summaries = [
        _run(tmp_path, "baseline", {}, p["bt"], p["bi"], base_answers),
        _run(tmp_path, "iti", {"alpha": 5.0}, p["it"], p["ii"], iti_answers),
    ]
    # labels of the answers to the first 30 questions of fold 0 only (both methods' answers), one item per pair
    items = {(f"q0-{i}", a[0][i]) for i in range(30) for a in (base_answers, iti_answers)}
    items = sorted(items)
    labels = pd.DataFrame({
        "question": [q for q, _ in items], "answer": [a for _, a in items],
        "truthful": rng.integers(0, 2, len(items)), "informative": rng.integers(0, 2, len(items)),
    })  # fmt: skip
    return summaries, labels, p


def test_each_labelled_answer_carries_its_judges_scores_and_labels(runs):
    summaries, labels, p = runs
    joined, judges = labelled_verdicts(summaries, labels)
    assert judges == ["truth `t@1`", "info `i@2`"]
    assert len(joined) == 60 and set(joined["fold"]) == {0} and set(joined["method"]) == {"baseline", "iti"}
    assert set(joined["setting"]) == {"-", "alpha = 5"}
    row = joined[(joined["method"] == "iti") & (joined["question"] == "q0-3")].iloc[0]
    assert row["answer"] == "iti answer 3" and row["truth_score"] == pytest.approx(p["it"][0][3])
    want = labels.set_index(["question", "answer"]).loc[("q0-3", "iti answer 3")]
    assert (row["truthful"], row["informative"]) == (want["truthful"], want["informative"])


def test_agreement_and_changes_against_an_independent_count(runs):
    summaries, labels, p = runs
    joined, judges = labelled_verdicts(summaries, labels)
    text = check_markdown(joined, judges, "check")
    lab = labels.set_index(["question", "answer"])
    t = {m: np.array([lab.loc[(f"q0-{i}", a), "truthful"] for i, a in enumerate(ans)])
         for m, ans in (("baseline", [f"base answer {i}" for i in range(30)]),
                        ("iti", [f"iti answer {i}" if i % 2 else f"base answer {i}" for i in range(30)]))}  # fmt: skip
    judge_iti = p["it"][0][:30] > 0.5
    acc = np.mean(judge_iti == (t["iti"] == 1))
    row = next(r for r in text.splitlines() if r.startswith("| iti | alpha = 5 | truth | 30 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == f"{100 * t['iti'].mean():.1f}" and cells[5] == f"{100 * judge_iti.mean():.1f}"
    assert cells[6].startswith(f"{acc:.2f} (")
    change = next(r for r in text.splitlines() if r.startswith("| iti | alpha = 5 | 30 |"))
    by_labels = 100 * (t["iti"].astype(float) - t["baseline"]).mean()
    by_judge = 100 * (judge_iti.astype(float) - (p["bt"][0][:30] > 0.5)).mean()
    cells = [c.strip() for c in change.strip("|").split("|")]
    assert cells[3].startswith(f"{by_labels:+.1f} (") and cells[4].startswith(f"{by_judge:+.1f} (")


def test_unlabelled_runs_and_runs_without_answers_are_one_line_errors(runs, tmp_path):
    summaries, labels, _ = runs
    other = labels.assign(question="another question")
    joined, judges = labelled_verdicts(summaries, other)
    with pytest.raises(ValueError, match="no answer of these runs is labelled"):
        check_markdown(joined, judges, "check")
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([{"method": "iti", "fold": 0, "scored_answers": str(tmp_path / "gone.csv")}]))
    with pytest.raises(ValueError, match="names no scored answers that exist"):
        labelled_verdicts([bare], labels)


def test_the_command_writes_the_check_and_words_bad_labels_in_one_line(runs, tmp_path):
    summaries, labels, _ = runs
    path = tmp_path / "labels.csv"
    labels.to_csv(path, index=False)
    out = main([*map(str, summaries), "--labels", str(path), "--out", str(tmp_path / "check.md")])
    assert (
        out.read_text().startswith("### The judges against labels.csv")
        and "by `python -m slim.judges.check" in out.read_text()
    )
    path.write_text("question,answer\nq,a\n")
    proc = subprocess.run([sys.executable, "-m", "slim.judges.check", str(summaries[0]), "--labels", str(path),
                           "--out", str(tmp_path / "x.md")], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "is not a labels file" in proc.stderr

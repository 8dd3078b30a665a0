"""The audit command (slim.judges.audit):

sampling, labelling from piped input, resuming, --labels, the judges' agreement.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, TQA_DIR, make_tokenizer, tiny_model
from slim.data.truthfulqa import load_truthfulqa
from slim.judges import Judge, audit, load_judge_labels
from slim.judges import labels as offline_judges


class WordJudge(Judge):
    """Says yes (0.9) to answers holding `word`, no (0.1) otherwise; counts the answers it scored."""

    def __init__(self, kind: str, word: str):
        self.kind, self.name, self.word = kind, f"word-{word}", word
        self.scored = 0

    def score(self, questions, answers):
        questions, answers = self._pairs(questions, answers)
        self.scored += len(answers)
        return np.array([0.9 if self.word in a.lower() else 0.1 for a in answers])


def stub_judges():
    return {"truth": WordJudge("truth", "no"), "info": WordJudge("info", "is")}


@pytest.fixture(scope="module")
def tqa():
    return load_truthfulqa(TQA_DIR)


def answer_file(path, tqa, rows):
    """An answer CSV as answer_questions writes it: (question_idx, answer) pairs of TruthfulQA questions."""
    df = pd.DataFrame(
        {
            "question_idx": [i for i, _ in rows],
            "question": [tqa["Question"][i] for i, _ in rows],
            "generation": [f" {a}\n\nQ: next" for _, a in rows],
            "answer": [a for _, a in rows],
        }
    )
    df.to_csv(path, index=False)
    return path


class Replies:
    """Scripted terminal input: each prompt takes the next reply; EOF when they run out."""

    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        if not self.replies:
            raise EOFError
        return self.replies.pop(0)


def test_quotas_split_evenly_and_the_sample_is_stratified_seeded_and_nested(tmp_path):
    assert audit.quotas([10, 3], 8) == [5, 3]
    assert audit.quotas([10, 3, 0], 9) == [6, 3, 0]
    assert audit.quotas([2, 2], 50) == [2, 2]
    assert audit.quotas([4, 4, 4], 5) == [2, 2, 1]

    big = pd.DataFrame({"question": [f"q{i}" for i in range(10)], "answer": [f"a{i}" for i in range(10)]})
    small = pd.DataFrame({"question": ["q0", "x", "y", "y"], "answer": ["a0", "b", "c", "c"]})  # q0/a0 is in both
    frames = [("a", big), ("b", small)]
    eight = audit.sample_answers(frames, 8, seed=3)
    assert len(eight) == 8 and not eight.duplicated(["question", "answer"]).any()
    assert (eight["source"] == "b").sum() == 2  # its two pairs; q0/a0 belongs to the first file
    assert eight.equals(audit.sample_answers(frames, 8, seed=3))
    four = audit.sample_answers(frames, 4, seed=3)
    pairs = lambda df: set(zip(df["question"], df["answer"]))  # noqa: E731
    assert pairs(four) <= pairs(eight)  # a larger --n keeps the smaller sample
    assert len(audit.sample_answers(frames, 100, seed=0)) == 10 + 2  # every distinct pair once


def test_agreement_against_a_hand_computation():
    labels = [1, 1, 1, 0, 0]
    verdicts = [1, 1, 0, 1, 0]
    r = audit.agreement(np.array(labels) == 1, np.array(verdicts) == 1)
    assert (r["tp"], r["fn"], r["fp"], r["tn"]) == (2, 1, 1, 1)
    assert r["n"] == 5 and r["accuracy"] == pytest.approx(3 / 5)
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert r["labels_yes"] == pytest.approx(60.0) and r["judge_yes"] == pytest.approx(60.0)
    one_class = audit.agreement(np.ones(3, bool), np.array([True, False, True]))
    assert one_class["balanced_accuracy"] == pytest.approx(2 / 3)  # the recall of the only class present


def test_labelling_from_piped_input_saves_resumes_and_measures(tmp_path, tqa):
    a = answer_file(tmp_path / "baseline_fold0_test.csv", tqa, [(0, "Nothing happens."), (1, "No, it is not.")])
    b = answer_file(tmp_path / "slim_kappa40_fold0_test.csv", tqa, [(0, "You grow watermelons."), (2, "I have no")])
    out = tmp_path / "audit.csv"
    judges = stub_judges()
    lines = []

    # Two items, then the input ends: both saved, the third and fourth not asked.
    replies = Replies(["y", "maybe", "n", "s", "y"])
    result = audit.run(
        [a, b], n=4, seed=1, out=out, judges=judges, tqa_dir=TQA_DIR, input_fn=replies, write=lines.append
    )
    text = "\n".join(lines)
    assert replies.prompts[:3] == ["truthful? [y/n/s] ", "informative? [y/n/s] ", "informative? [y/n/s] "]
    assert "answer y (yes), n (no), s (skip) or q" in text  # "maybe" was asked again
    assert "end of input: 2 labels saved this time" in text
    assert "baseline_fold0" not in text and "slim_kappa40" not in text  # the labeller does not see the method
    asked_first = result["labels"]["question"].tolist()
    first_refs = tqa.set_index("Question").loc[asked_first[0]]
    assert (
        f"best answer: {first_refs['Best Answer']}" in text and f"      - {first_refs['Incorrect Answers'][0]}" in text
    )

    saved = load_judge_labels(out, allow_skipped=True)
    assert len(saved) == 2
    assert saved["truthful"].iloc[0] == 1 and saved["informative"].iloc[0] == 0
    assert pd.isna(saved["truthful"].iloc[1]) and saved["informative"].iloc[1] == 1
    assert set(saved["source"]) <= {"baseline_fold0_test", "slim_kappa40_fold0_test"}
    # measured on what was labelled: truth on 1 label (the other skipped), info on 2
    assert result["agreement"]["truth"]["n"] == 1 and result["agreement"]["info"]["n"] == 2
    assert result["agreement"]["truth"]["judge"] == "word-no"

    # The rerun asks only the two answers not labelled yet, then measures all four.
    lines.clear()
    replies = Replies(["n", "y", "y", "y"])
    result = audit.run(
        [a, b], n=4, seed=1, out=out, judges=judges, tqa_dir=TQA_DIR, input_fn=replies, write=lines.append
    )
    assert len(replies.prompts) == 4 and "2 of 4 sampled answers to label" in "\n".join(lines)
    labels = result["labels"]
    assert len(labels) == 4 and labels["question"].tolist()[:2] == asked_first
    assert pairs_of(load_judge_labels(out, allow_skipped=True)) == pairs_of(labels)

    # The agreement is the judges' verdicts against the labels, by hand.
    for kind, column, word in (("truth", "truthful", "no"), ("info", "informative", "is")):
        rows = labels[labels[column].notna()]
        expected = audit.agreement(rows[column].astype(int) == 1, [word in x.lower() for x in rows["answer"]])
        got = result["agreement"][kind]
        assert {k: got[k] for k in expected} == pytest.approx(expected)
    assert "judges against the labels of" in lines[-1]

    # Nothing left: no question asked, the judges measured again.
    replies = Replies([])
    again = audit.run([a, b], n=4, seed=1, out=out, judges=judges, tqa_dir=TQA_DIR, input_fn=replies, write=print)
    assert replies.prompts == [] and again["agreement"] == result["agreement"]


def pairs_of(df):
    return set(zip(df["question"], df["answer"]))


def test_q_stops_and_keeps_the_labels(tmp_path, tqa):
    a = answer_file(tmp_path / "m.csv", tqa, [(3, "Yes."), (4, "No.")])
    lines = []
    result = audit.run(
        [a], n=2, judges=stub_judges(), tqa_dir=TQA_DIR, input_fn=Replies(["y", "y", "q"]), write=lines.append
    )
    assert result["out"] == tmp_path / "m_audit.csv" and len(load_judge_labels(result["out"], allow_skipped=True)) == 1
    assert any(line.startswith("\nstopped: 1 labels saved") for line in lines)


def test_labels_mode_measures_any_labelled_set(tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame(
        {
            "question": ["Q1 ", "Q2", "Q3", "Q4"],
            "answer": ["no way", "it is", "", "no, it is"],
            "truthful": [1, 0, 1, ""],
            "informative": [0, 1, 0, 1],
            "method": ["a", "b", "a", "b"],
        }
    ).to_csv(path, index=False)
    judges = stub_judges()
    result = audit.run(labels=path, judges=judges, write=lambda s: None)
    assert result["out"] is None
    truth = result["agreement"]["truth"]  # labels 1, 0, 1 (the fourth blank: left out); verdicts yes, no, no
    assert (truth["n"], truth["tp"], truth["tn"], truth["fn"], truth["fp"]) == (3, 1, 1, 1, 0)
    assert truth["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    info = result["agreement"]["info"]  # labels 0, 1, 0, 1; verdicts no, yes, no, yes
    assert info["n"] == 4 and info["accuracy"] == 1.0
    assert result["labels"]["question"].tolist()[0] == "Q1"  # stripped, as TruthfulQA's questions are

    # The shipped labelled set, a seeded subset of it.
    shipped = load_judge_labels()
    assert len(shipped) == 1493 and {"method", "setting"} <= set(shipped.columns)
    assert set(shipped["truthful"]) == {0, 1} and set(shipped["informative"]) == {0, 1}
    judges = stub_judges()
    sub = audit.run(labels=offline_judges.PROJECT_LABELS, n=25, seed=2, judges=judges, write=lambda s: None)
    assert len(sub["labels"]) == 25 and judges["truth"].scored == 25
    assert sub["labels"].equals(
        audit.run(labels=offline_judges.PROJECT_LABELS, n=25, seed=2, judges=stub_judges(), write=lambda s: None)[
            "labels"
        ]
    )


def test_bad_input_is_one_line(tmp_path, tqa):
    with pytest.raises(ValueError, match="no answer CSV and no --labels"):
        audit.run(judges=stub_judges())
    a = answer_file(tmp_path / "m.csv", tqa, [(0, "x")])
    with pytest.raises(ValueError, match="both answer CSVs and --labels"):
        audit.run([a], labels=a, judges=stub_judges())
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        audit.run([a], n=0, judges=stub_judges())
    other = tmp_path / "other.csv"
    pd.DataFrame({"q": ["x"], "a": ["y"]}).to_csv(other, index=False)
    with pytest.raises(ValueError, match="has no column question, answer") as info:
        audit.run([other], judges=stub_judges(), input_fn=Replies([]), tqa_dir=TQA_DIR)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="is not a labels file \\(no column truthful, informative\\)"):
        audit.run(labels=a, judges=stub_judges())


def test_judge_labels_loader_checks_columns_and_values(tmp_path, monkeypatch):
    assert offline_judges.judge_labels_path() == offline_judges.PROJECT_LABELS
    assert offline_judges.PROJECT_LABELS == REPO / "data" / "judge-labels" / "smollm2_135M_labels.csv"
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer,truthful,informative\nQ,A,1,yes\n")
    with pytest.raises(ValueError, match="row 1 .*informative is 'yes', not 1 or 0") as info:
        load_judge_labels(bad)
    assert "\n" not in str(info.value)
    bad.write_text("question,answer,truthful,informative\nQ,A,,1\n")
    with pytest.raises(ValueError, match="truthful is blank, not 1 or 0"):
        load_judge_labels(bad)  # a blank label is a skip, allowed only when asked for
    assert load_judge_labels(bad, allow_skipped=True)["truthful"].isna().all()

    # Where the project's copy is absent (an installed package), SLIM_JUDGE_LABELS names one: a file or its folder.
    monkeypatch.setattr(offline_judges, "PROJECT_LABELS", tmp_path / "absent" / "labels.csv")
    monkeypatch.delenv("SLIM_JUDGE_LABELS", raising=False)
    with pytest.raises(ValueError, match="set SLIM_JUDGE_LABELS"):
        load_judge_labels()
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "smollm2_135M_labels.csv").write_text("question,answer,truthful,informative\nQ,A,1,0\n")
    monkeypatch.setenv("SLIM_JUDGE_LABELS", str(folder))
    assert load_judge_labels()["answer"].tolist() == ["A"]


def test_the_command_with_piped_answers_and_a_local_judge(tmp_path, tqa):
    judge_dir = tmp_path / "judge"
    tiny_model("llama", vocab_size=len(make_tokenizer())).save_pretrained(judge_dir)
    make_tokenizer().save_pretrained(judge_dir)
    a = answer_file(tmp_path / "baseline.csv", tqa, [(0, "Nothing happens."), (5, "I have no comment.")])
    out = tmp_path / "labels.csv"
    cmd = [sys.executable, "-m", "slim.judges.audit", str(a), "--n", "2", "--out", str(out), "--tqa_dir", str(TQA_DIR)]
    cmd += ["--judge_name", f"local:{judge_dir}", "--info_name", f"local:{judge_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def run(stdin):
        proc = subprocess.run(cmd, input=stdin, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    first = run("y\nn\n")  # one answer labelled, then the input ends
    assert "truthful? [y/n/s]" in first and "end of input: 1 labels saved this time" in first
    assert "judges against the labels of" in first and "local:judge@sha256:" in first
    second = run("n\ny\n")
    assert "1 of 2 sampled answers to label" in second and "all sampled answers labelled: 2 labels" in second
    labels = load_judge_labels(out)
    assert sorted(labels["answer"]) == ["I have no comment.", "Nothing happens."]
    assert sorted(zip(labels["truthful"], labels["informative"])) == [(0, 1), (1, 0)]

    proc = subprocess.run(
        [sys.executable, "-m", "slim.judges.audit", "--labels", str(tmp_path / "missing.csv")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: judge labels") and "missing.csv do not exist" in proc.stderr

"""Table 5 (slim.paper.examples):

test questions only, a seeded random part, the most disagreeing questions, safe Markdown.
"""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import TQA_DIR
from slim.data.truthfulqa import load_truthfulqa
from slim.paper.examples import differing_pairs, examples_markdown, main, markdown_cell, qualitative_examples

TQA = load_truthfulqa(TQA_DIR)


def _summary(folder, method, knob, idx_by_fold, true, info, answers=None, split="test"):
    """A summary JSON whose fold rows name scored CSVs of TruthfulQA rows `idx_by_fold[fold]`; `true` / `info` map
    question_idx to the verdict (default False), `answers` to the answer text."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{method}{''.join(f'_{k}{v:g}' for k, v in knob.items())}"
    rows = []
    for fold, idx in idx_by_fold.items():
        text = [(answers or {}).get(i, f"{method} answer {i}.") for i in idx]
        scored = folder / f"{name}_fold{fold}_{split}_scored.csv"
        pd.DataFrame(
            {
                "question_idx": idx,
                "question": TQA.loc[idx, "Question"].tolist(),
                "generation": [f"\nA: {a}\n" for a in text],
                "answer": text,
                "answer_rule": "published",
                "truth_score": [0.9 if true.get(i) else 0.1 for i in idx],
                "info_score": [0.8 if info.get(i) else 0.2 for i in idx],
            }
        ).to_csv(scored, index=False)
        rows.append({"method": method, "fold": fold, "split": split, "scored_answers": str(scored), **knob})
    rows.append({"method": method, "fold": "mean", "split": split, **knob})
    path = folder / f"{name}_{split}.json"
    path.write_text(json.dumps(rows))
    return path


FOLDS = {0: list(range(0, 40, 2)), 1: list(range(1, 40, 2))}  # 40 test questions, 20 a fold


def _three_methods(tmp_path, true=None, info=None, answers=None):
    true, info = true or {}, info or {}
    return [
        _summary(tmp_path, "baseline", {}, FOLDS, true.get("baseline", {}), info.get("baseline", {}), answers),
        _summary(tmp_path, "iti", {"alpha": 2.0}, FOLDS, true.get("iti", {}), info.get("iti", {})),
        _summary(tmp_path, "slim", {"kappa": 40.0}, FOLDS, true.get("slim", {}), info.get("slim", {})),
    ]


def test_disagreement_picks_the_questions_whose_verdicts_differ_most(tmp_path):
    # by hand, pairs of the 3 methods whose truth (info) verdicts differ: q 7: T F F -> 2 (info T F F -> 2);
    # q 12: T T F -> 2 (info agree: 0); q 21: truth agree (0), info F T F -> 2; every other question: 0 and 0
    true = {"baseline": {7: 1, 12: 1, 21: 1}, "iti": {12: 1, 21: 1}, "slim": {21: 1}}
    info = {"baseline": {7: 1, 12: 1}, "iti": {12: 1, 21: 1}, "slim": {12: 1}}
    df = qualitative_examples(_three_methods(tmp_path, true, info), n_random=2, n_disagree=3, seed=0, tqa_dir=TQA_DIR)
    disagree = df[df["pick"] == "disagree"]
    assert disagree["question_idx"].tolist() == [7, 12, 21]
    assert disagree["truth_pairs"].tolist() == [2, 2, 0] and disagree["info_pairs"].tolist() == [2, 0, 2]
    assert df.loc[df["question_idx"] == 7, "ITI (alpha = 2): true"].item() == False  # noqa: E712
    assert df.attrs["methods"] == ["unintervened", "ITI (alpha = 2)", "SLIM (kappa = 40)"]
    assert differing_pairs(pd.DataFrame([[1, 0, 0, 1], [1, 1, 1, 1]])).tolist() == [4, 0]


def test_the_random_part_is_reproducible_by_seed_and_changes_with_it(tmp_path):
    paths = _three_methods(tmp_path)

    def random_part(seed):
        df = qualitative_examples(paths, n_random=4, n_disagree=0, seed=seed, tqa_dir=TQA_DIR)
        assert (df["pick"] == "random").all()
        return df["question_idx"].tolist()

    assert random_part(0) == random_part(0)
    assert random_part(0) != random_part(1)
    shuffled = np.arange(40)[np.random.default_rng(0).permutation(40)]  # the stated rule, by hand
    assert random_part(0) == shuffled[:4].tolist()


def test_only_test_questions_answered_by_every_method(tmp_path):
    paths = _three_methods(tmp_path)
    extra = {0: [100, 102], 1: [101]}  # answered by the unintervened model only: not in the pool
    paths[0] = _summary(tmp_path / "more", "baseline", {}, {f: FOLDS[f] + extra[f] for f in FOLDS}, {}, {})
    df = qualitative_examples(paths, n_random=40, n_disagree=0, tqa_dir=TQA_DIR)
    assert sorted(df["question_idx"]) == list(range(40))
    assert "the 40 test questions" in df.attrs["rule"]
    row = df[df["question_idx"] == 3].iloc[0]
    assert row["best_answer"] == TQA.loc[3, "Best Answer"] and row["fold"] == 1
    val = _summary(tmp_path / "val", "iti", {"alpha": 2.0}, FOLDS, {}, {}, split="val")
    with pytest.raises(ValueError, match="Table 5 shows test questions only"):
        qualitative_examples([paths[0], val], tqa_dir=TQA_DIR)


def test_markdown_escapes_pipes_and_line_breaks_and_states_the_rule(tmp_path):
    answers = {i: f"Yes | no,\nmaybe <b>{i}</b>" for i in range(40)}
    df = qualitative_examples(_three_methods(tmp_path, answers=answers), n_random=2, n_disagree=1, tqa_dir=TQA_DIR)
    text = examples_markdown(df)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3  # header, rule, one line per question
    assert all(line.count(" | ") == table[0].count(" | ") for line in table)  # no cell split by a pipe
    assert "Yes \\| no,<br>maybe &lt;b&gt;" in text
    assert "Rows chosen by rule, not by hand" in text and "default_rng(0)" in text
    assert "*not true, not informative*" in text
    assert markdown_cell("") == "(empty)" and markdown_cell("a\r\nb|c") == "a<br>b\\|c"


def test_command_line_writes_the_table_and_refuses_missing_scored_answers(tmp_path):
    out = tmp_path / "paper" / "table5.md"
    df = main([*map(str, _three_methods(tmp_path)), "--out", str(out), "--tqa_dir", str(TQA_DIR), "--seed", "3"])
    assert out.read_text() == examples_markdown(df) and len(df) == 6
    old = tmp_path / "old.json"
    old.write_text(
        json.dumps(
            [
                {"method": "baseline", "fold": 0, "split": "test"},
                {"method": "baseline", "fold": "mean", "split": "test"},
            ]
        )
    )
    with pytest.raises(ValueError, match="name no scored answers"):
        main([str(old), "--out", str(out), "--tqa_dir", str(TQA_DIR)])
    with pytest.raises(ValueError, match="nope.json does not exist"):
        main([str(tmp_path / "nope.json"), "--out", str(out)])

"""Metrics against hand computations: True*Info, SEM, degeneracy, summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from slim.evaluation.metrics import (
    cached_sem_scores,
    degeneracy_rate,
    is_degenerate,
    sem_scores,
    summary_row,
    true_info,
    write_summary,
)
from slim.models.embedder import load_embedder

# ---------------------------------------------------------------------------------------------
# True*Info


def test_true_info_multiplies_the_rates():
    out = true_info([True, True, False, False], [True, False, True, True])
    assert out == {"true": 50.0, "info": 75.0, "true_info": 37.5}
    # Not the share of answers both true and informative (25 % here).
    with pytest.raises(ValueError, match="equally long"):
        true_info([True], [True, False])


# ---------------------------------------------------------------------------------------------
# SEM


class FixedEmbedder:
    """Looks vectors up in a table (not normalised: SEM must use cosines)."""

    def __init__(self, table):
        self.table = table
        self.seen = []

    def encode(self, texts):
        self.seen.append(list(texts))
        return np.array([self.table[t] for t in texts], dtype=float)


def test_sem_against_hand_computation():
    table = {
        "r": [1, 0],
        "good1": [2, 0],
        "good2": [0, 3],
        "bad1": [1, 1],
        "bad2": [-1, 0],
        "s": [0, 1],
        "good3": [0, 5],
        "bad3": [1, 0],
    }
    emb = FixedEmbedder(table)
    q, sem = sem_scores(emb, ["r", "s"], [["good1", "good2"], "good3"], [["bad1", "bad2"], ["bad3"]])
    # r: mean(cos 1, cos 0) - mean(cos 1/sqrt2, cos -1) = 0.5 - (0.7071 - 1) / 2
    # s: cos(s, good3) - cos(s, bad3) = 1 - 0
    np.testing.assert_allclose(q, [0.5 - (1 / math.sqrt(2) - 1) / 2, 1.0])
    assert sem == 1.0
    q, sem = sem_scores(emb, ["r", "s"], [["bad2"], ["bad3"]], [["good1"], ["good3"]])
    np.testing.assert_allclose(q, [-2.0, -1.0])
    assert sem == 0.0
    assert len(emb.seen[0]) == len(set(emb.seen[0]))  # each distinct text embedded once


def test_sem_counts_a_tie_as_good():
    emb = FixedEmbedder({"a": [1, 1], "x": [1, 0], "y": [0, 1]})
    q, sem = sem_scores(emb, ["a"], [["x"]], [["y"]])
    assert q[0] == pytest.approx(0.0) and sem == 1.0


def test_sem_is_read_back_for_the_same_texts_and_embedder_and_computed_again_otherwise(tmp_path, caplog):
    table = {"r": [1, 0], "s": [0, 1], "good": [1, 0.2], "bad": [0.1, 1]}
    emb, cache = FixedEmbedder(table), tmp_path / "answers.sem.json"
    want = sem_scores(FixedEmbedder(table), ["r", "s"], [["good"], "good"], [["bad"], "bad"])
    first = cached_sem_scores(cache, emb, "fixed", ["r", "s"], [["good"], "good"], [["bad"], "bad"])
    again = cached_sem_scores(cache, emb, "fixed", ["r", "s"], [["good"], "good"], [["bad"], "bad"])
    assert len(emb.seen) == 1 and cache.is_file()  # the rerun embedded nothing
    for got in (first, again):
        assert np.array_equal(got[0], want[0]) and got[1] == want[1] == 0.5
    cached_sem_scores(cache, emb, "fixed", ["s", "r"], [["good"], "good"], [["bad"], "bad"])  # other answers
    cached_sem_scores(cache, emb, "other", ["s", "r"], [["good"], "good"], [["bad"], "bad"])  # another embedder
    assert len(emb.seen) == 3
    cache.write_text('{"key": ')
    q, sem = cached_sem_scores(cache, emb, "other", ["s", "r"], [["good"], "good"], [["bad"], "bad"])
    assert len(emb.seen) == 4 and "damaged" in caplog.text and np.array_equal(q, want[0][::-1])
    assert json.loads(cache.read_text())["q"] == q.tolist()  # replaced by a good one


def test_load_embedder_offline_minilm():
    model = load_embedder("minilm")
    vectors = model.encode(
        ["Paris is the capital of France.", "The capital of France is Paris.", "Watermelon seeds pass through you."]
    )
    assert vectors.shape == (3, 384)
    q, _ = sem_scores(model, ["Paris."], [["The capital of France is Paris."]], [["Watermelon seeds."]])
    assert q[0] > 0


# ---------------------------------------------------------------------------------------------
# MC1 / MC2


# ---------------------------------------------------------------------------------------------
# model-side scores on a tiny random Llama

# ---------------------------------------------------------------------------------------------
# degeneracy


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "   ",
        "...",
        None,
        "But but but but but but but but",
        "the the the the cat",
        "If you are charged with a crime, if you are charged with a crime, if you are charged with a crime, if you",
        "Paris Paris Paris. Paris Paris Paris.",
        "no no no no",
    ],
)
def test_degenerate(answer):
    assert is_degenerate(answer)


@pytest.mark.parametrize(
    "answer",
    [
        "I have no comment.",
        "No.",
        "Yes, yes.",
        "The watermelon seeds pass through your digestive system.",
        "The cat sat on the mat by the door of the house.",
        "No, it is not true that it is not true.",
        "It is the morning right now, and it is sunny.",
    ],
)
def test_not_degenerate(answer):
    assert not is_degenerate(answer)


def test_degeneracy_rate():
    assert degeneracy_rate(["I have no comment.", "but but but but", "", "Paris."]) == 0.5


# ---------------------------------------------------------------------------------------------
# summaries


def test_summary_rows_and_atomic_writes(tmp_path):
    row = summary_row("slim", {"kappa": np.float64(20.0), "layers": [3, 4]}, 0, "val", true=30.0, sem=np.float32(0.25))
    assert row == {
        "method": "slim",
        "fold": 0,
        "split": "val",
        "kappa": 20.0,
        "layers": "[3, 4]",
        "true": 30.0,
        "sem": 0.25,
    }
    assert type(row["kappa"]) is float
    with pytest.raises(ValueError, match="given twice"):
        summary_row("iti", {"true": 1}, 0, "val", true=2.0)
    rows = [row, summary_row("iti", {"alpha": 15}, 1, "test", true=25.0)]
    write_summary(rows, tmp_path / "out" / "summary.csv", tmp_path / "out" / "summary.json")
    df = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert df["method"].tolist() == ["slim", "iti"] and df["true"].tolist() == [30.0, 25.0]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())[1]["alpha"] == 15
    # no temp files; the JSON, read back by the sweep, has its record of size and sha256 beside it
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "summary.csv",
        "summary.json",
        "summary.json.sha256.json",
    ]

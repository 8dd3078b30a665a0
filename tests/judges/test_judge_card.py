"""The judge card's metrics against hand computations, and the offline judge's cross-fitting."""

import numpy as np
import pandas as pd
import pytest
from test_judges import TQA_DIR, HashEmbedder

from slim.judges import (
    OfflineJudge,
    calibration_error,
    card_row,
    load_judge_data,
    make_judge,
    mean_interval,
    paired_shifts,
)


def test_calibration_error_against_a_hand_computation():
    labels = [1, 0, 1, 1, 0]
    scores = [0.05, 0.15, 0.55, 0.95, 1.0]  # bins 0, 1, 5, 9, 9 (a score of 1 falls in the last bin)
    # bin 0: |1 - 0.05| x 1; bin 1: |0 - 0.15| x 1; bin 5: |1 - 0.55| x 1; bin 9: |0.5 - 0.975| x 2
    assert calibration_error(labels, scores) == pytest.approx((0.95 + 0.15 + 0.45 + 0.95) / 5)
    assert calibration_error([1, 0], [1.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="probabilities in"):
        calibration_error([1], [1.5])


def test_card_row_counts_verdicts_above_the_threshold():
    row = card_row([1, 1, 0, 0, 0], [0.9, 0.4, 0.6, 0.1, 0.5])  # verdicts yes, no, yes, no, no (0.5 is not above)
    assert (row["tp"], row["fn"], row["fp"], row["tn"]) == (1, 1, 1, 2)
    assert row["accuracy"] == pytest.approx(3 / 5)
    assert row["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert row["judge_yes"] == pytest.approx(40.0) and row["labels_yes"] == pytest.approx(40.0)
    assert row["ece"] == pytest.approx(calibration_error([1, 1, 0, 0, 0], [0.9, 0.4, 0.6, 0.1, 0.5]))


def test_paired_shifts_compare_each_method_with_the_unintervened_answers_on_shared_questions():
    table = pd.DataFrame(
        {
            "question": ["a", "b", "c", "a", "b", "d", "a", "c"],
            "method": ["baseline"] * 3 + ["slim"] * 3 + ["iti"] * 2,
            "setting": ["none"] * 3 + ["kappa40"] * 3 + ["alpha5"] * 2,
            "truthful": [0, 1, 0, 1, 1, 1, 1, 1],
            "yes_j": [False, False, False, True, False, True, False, True],
        }
    )
    rows = {(r["method"], r["setting"]): r for r in paired_shifts(table, "truthful", {"j": "yes_j"})}
    slim, iti = rows[("slim", "kappa40")], rows[("iti", "alpha5")]
    assert slim["n"] == 2 and iti["n"] == 2  # "d" has no unintervened answer
    assert slim["labels"][0] == pytest.approx(50.0)  # a: 0 -> 1, b: 1 -> 1
    assert slim["j"][0] == pytest.approx(50.0)  # a: no -> yes, b: no -> no
    assert iti["labels"][0] == pytest.approx(100.0) and iti["j"][0] == pytest.approx(50.0)
    for r in (slim, iti):
        for name in ("labels", "j"):
            mean, lo, hi = r[name]
            assert lo <= mean <= hi


def test_mean_interval_brackets_the_mean_and_narrows_with_more_questions():
    rng = np.random.default_rng(1)
    small, large = rng.normal(1.0, 1.0, 30), rng.normal(1.0, 1.0, 3000)
    m, lo, hi = mean_interval(small)
    assert m == pytest.approx(small.mean()) and lo < m < hi
    m2, lo2, hi2 = mean_interval(large)
    assert lo2 < 1.0 < hi2 and (hi2 - lo2) < (hi - lo) / 5
    assert mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def _labels_csv(path, rows):
    pd.DataFrame(rows, columns=["question", "answer", "truthful", "informative"]).to_csv(path, index=False)
    return path


@pytest.mark.skipif(not (TQA_DIR / "finetune_truth.jsonl").exists(), reason="TruthfulQA judge data not found")
def test_a_cross_fitted_verdict_never_depends_on_a_label_of_its_question(tmp_path):
    """Flip every label of one fold's questions (both sources) and retrain: that fold's scores stay the same."""
    questions, answers, labels, _ = load_judge_data("truth", TQA_DIR)
    model_rows = [(q, a, int(y), 1) for q, a, y in list(zip(questions, answers, labels))[::97]]
    opts = dict(tqa_dir=TQA_DIR, embedder=HashEmbedder(), embedder_name="hash-bow", max_rows=800, epochs=5)
    judge = OfflineJudge("truth", cache_dir=tmp_path, answer_labels=_labels_csv(tmp_path / "l.csv", model_rows), **opts)
    q, a, y, w = judge.all_training_data()  # the human subsample, then the model's labelled answers
    assert np.sum(w == 5.0) == len(model_rows) and np.sum(w == 1.0) == len(q) - len(model_rows)
    assert q[-len(model_rows) :] == [r[0] for r in model_rows]
    scores = judge.fit(q, a, y, w).score(q, a)

    fold0 = judge.folds_of(q) == 0
    assert 0 < fold0.sum() < len(q) and judge.cross_fit == 5
    flipped = OfflineJudge("truth", cache_dir=tmp_path, answer_labels=tmp_path / "l.csv", **opts)
    again = flipped.fit(q, a, np.where(fold0, ~y, y), w).score(q, a)
    np.testing.assert_array_equal(again[fold0], scores[fold0])  # fold 0's MLP saw none of the flipped labels
    assert not np.allclose(again[~fold0], scores[~fold0])  # the other folds' MLPs did


def test_offline_and_offline_human_are_different_judges(tmp_path):
    labels = _labels_csv(tmp_path / "l.csv", [("What is 1+1?", "2", 1, 1)])
    with_answers = make_judge("offline", "truth", tqa_dir=TQA_DIR, cache_dir=tmp_path, answer_labels=labels)
    human = make_judge("offline-human", "truth", tqa_dir=TQA_DIR, cache_dir=tmp_path)
    assert with_answers.name == "offline" and human.name == "offline-human" and human.answer_labels is None
    assert with_answers.model_path() != human.model_path()
    assert human.model_path().name.startswith("offline-human-truth-")
    with pytest.raises(ValueError, match="cross_fit"):
        OfflineJudge("truth", cross_fit=0)
    with pytest.raises(ValueError, match="answer_weight"):
        OfflineJudge("truth", answer_weight=-1.0, answer_labels=labels)

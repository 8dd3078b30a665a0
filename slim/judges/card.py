"""The judge card: how a judge's verdicts agree with labels, overall, per source and per method.

    agreement(labels, verdicts)          n, accuracy, balanced accuracy, confusion counts, yes shares
    calibration_error(labels, scores)    expected calibration error of P(yes), equal-width bins
    card_row(labels, scores)             both of the above for one group of rows
    paired_shifts(table, ...)            each method's change from the unintervened answers on the same
                                         questions, by the labels and by the judge, with 95 % intervals

benchmarks/eval_judges.py prints the card; slim.judges.audit uses `agreement`.
"""

from __future__ import annotations

import math

import numpy as np

from ..stats import mean_interval
from .base import THRESHOLD

__all__ = ["agreement", "calibration_error", "card_row", "paired_shifts", "mean_interval"]


def agreement(labels, verdicts) -> dict:
    """n, accuracy, balanced accuracy (mean recall of the classes present), TP / FP / TN / FN with yes as positive,
    and the share of yes among the labels and the verdicts (percentages)."""
    y = np.asarray(labels, dtype=bool)
    v = np.asarray(verdicts, dtype=bool)
    if y.shape != v.shape:
        raise ValueError(f"agreement needs one verdict per label; got {y.shape} labels and {v.shape} verdicts.")
    tp, fp = int(np.sum(y & v)), int(np.sum(~y & v))
    tn, fn = int(np.sum(~y & ~v)), int(np.sum(y & ~v))
    n = len(y)
    recalls = [hits / total for hits, total in ((tp, tp + fn), (tn, tn + fp)) if total]
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else math.nan,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else math.nan,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "labels_yes": 100.0 * y.mean() if n else math.nan,
        "judge_yes": 100.0 * v.mean() if n else math.nan,
    }


def calibration_error(labels, scores, n_bins: int = 10) -> float:
    """Expected calibration error: over `n_bins` equal-width bins of P(yes) on [0, 1], the row-weighted mean of
    |share of yes labels - mean P(yes)| in each bin (a score of exactly 1 falls in the last bin)."""
    y = np.asarray(labels, dtype=float)
    p = np.asarray(scores, dtype=float)
    if y.shape != p.shape or not len(y):
        return math.nan
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("calibration_error needs probabilities in [0, 1]; got scores outside it.")
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    gaps = [abs(y[bins == b].mean() - p[bins == b].mean()) * np.sum(bins == b) for b in np.unique(bins)]
    return float(np.sum(gaps) / len(y))


def card_row(labels, scores, threshold: float = THRESHOLD) -> dict:
    """agreement() of the verdicts `scores > threshold` with the labels, and the scores' calibration error."""
    scores = np.asarray(scores, dtype=float)
    return {**agreement(labels, scores > threshold), "ece": calibration_error(labels, scores)}


def paired_shifts(table, label: str, verdicts: dict[str, str], reference=("baseline", "none")) -> list[dict]:
    """Each method's change (points of yes %) from the `reference` method's answers on the same questions.

    `table` has columns question, method, setting, the label column `label` (1 / 0) and one column of verdicts
    (bool) per judge, named by `verdicts` ({judge name: column}). For every (method, setting) other than the
    reference, on the questions both have: the labels' shift and each judge's, with paired 95 % bootstrap
    intervals over questions. A judge that sees the edits moves as the labels do.
    """
    ref = table[(table["method"] == reference[0]) & (table["setting"] == reference[1])]
    ref = ref.drop_duplicates("question").set_index("question")
    rows = []
    for (method, setting), group in table.groupby(["method", "setting"], sort=True):
        if (method, setting) == tuple(reference):
            continue
        group = group.drop_duplicates("question").set_index("question")
        shared = group.index.intersection(ref.index)
        if not len(shared):
            continue
        row = {"method": method, "setting": setting, "n": len(shared)}
        for name, column in {"labels": label, **verdicts}.items():
            diff = 100.0 * (group.loc[shared, column].astype(float) - ref.loc[shared, column].astype(float))
            row[name] = mean_interval(diff.to_numpy())
        rows.append(row)
    return rows

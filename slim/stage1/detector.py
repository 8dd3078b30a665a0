"""The layer detector: a layer's H head probes vote, and it fires when at least tau of them say undesirable.

tau is chosen per layer on the validation split by the hard risk FPR + bl * FNR,
and the layer with the best detector (by a stated criterion) is the one that
stage 2 edits.
"""

import math

import numpy as np

from ..config import LAYER_CRITERIA
from .losses import risk_from_counts
from .probes import as_tensor


def layer_metrics(pred, y):
    """Confusion counts and rates of a binary detector. pred (N,) bool, y (N,) 0/1.

    Rates with an empty denominator are 0 rather than NaN: fpr = 0 without
    negatives, fnr = 0 without positives, f1 = 0 when there are no positives
    and nothing is predicted positive (2 TP + FP + FN = 0).
    """
    pred = np.asarray(pred).astype(bool).reshape(-1)
    y = np.asarray(y).astype(bool).reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"pred and y must have the same length, got {pred.shape[0]} and {y.shape[0]}")
    tp = int((pred & y).sum())
    tn = int((~pred & ~y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    n = tp + tn + fp + fn
    return {
        "acc": (tp + tn) / n if n else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0,
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "fpr": fp / (fp + tn) if (fp + tn) else 0.0,
        "fnr": fn / (fn + tp) if (fn + tp) else 0.0,
    }


def _vote_sweep(votes, y, bl):
    """Hard FPR + bl*FNR of the layer detector for tau = 0..H-1: (H,) float64."""
    votes = np.asarray(votes)
    if votes.ndim != 2:
        raise ValueError(f"votes must have shape (N, H), got {votes.shape}")
    if not (bl >= 0 and math.isfinite(bl)):
        raise ValueError(f"bl must be a finite number >= 0 (weight of FNR), got {bl}")
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != votes.shape[0]:
        raise ValueError(f"y must have {votes.shape[0]} labels to match votes, got {y.shape[0]}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must be binary: 0 = desirable, 1 = undesirable")
    y = y.astype(bool)
    n1 = int(y.sum())
    n0 = y.shape[0] - n1
    if n1 == 0 or n0 == 0:
        raise ValueError("y needs both labels to choose tau (FPR and FNR are undefined otherwise)")
    s = votes.astype(bool).sum(1)  # heads voting undesirable, per row
    H = votes.shape[1]
    losses = np.empty(H)
    for tau in range(H):
        fire = s >= tau
        losses[tau] = risk_from_counts(int((fire & ~y).sum()), int((~fire & y).sum()), n0, n1, bl)
    return losses


def choose_tau(votes, y, bl=1.0):
    """Vote threshold tau in {0..H-1} minimising hard FPR + bl*FNR on val.

    votes (N, H) bool (p_h > 0.5), y (N,). Ties go to the smallest tau: the
    most sensitive detector among equals, in keeping with the risk-aware aim
    of not missing undesirable content.
    """
    return int(np.argmin(_vote_sweep(votes, y, bl)))  # argmin: first of equals


def evaluate_layers(probes, X_val, y_val, bl=1.0):
    """Per-layer detector on val: a list of L dicts (layer, tau, val_loss and layer_metrics).

    X_val is either activations (N, L, H, d), scored with the fitted probes,
    or head probabilities (N, L, H) already computed (probes may be None).
    """
    X_val = as_tensor(X_val, "X_val")
    if X_val.ndim == 4:
        if probes is None:
            raise ValueError("pass fitted probes to score activations (N, L, H, d), or pass probabilities (N, L, H)")
        proba = probes.predict_proba(X_val)
    elif X_val.ndim == 3:
        proba = X_val
    else:
        raise ValueError(f"X_val must be activations (N, L, H, d) or probabilities (N, L, H), got {tuple(X_val.shape)}")
    votes = (proba > 0.5).cpu().numpy()  # (N, L, H)
    y = np.asarray(y_val).reshape(-1)
    rows = []
    for layer in range(votes.shape[1]):
        losses = _vote_sweep(votes[:, layer], y, bl)
        tau = int(np.argmin(losses))
        pred = votes[:, layer].sum(1) >= tau
        rows.append({"layer": layer, "tau": tau, "val_loss": float(losses[tau]), **layer_metrics(pred, y)})
    return rows


def choose_layer(rows, criterion="val_loss"):
    """The layer (its "layer" entry) whose row minimises the criterion; the first on ties.

    criterion: "val_loss" (FPR + bl*FNR at the chosen tau), "fnr", "fpr", "1-acc" or "1-f1".
    """
    if criterion not in LAYER_CRITERIA:
        raise ValueError(f"criterion must be one of {LAYER_CRITERIA}, got {criterion!r}")
    if not rows:
        raise ValueError("rows is empty; run evaluate_layers first")
    key = {"1-acc": lambda r: 1 - r["acc"], "1-f1": lambda r: 1 - r["f1"]}.get(criterion, lambda r: r[criterion])
    best = int(np.argmin([key(r) for r in rows]))
    return int(rows[best].get("layer", best))

"""Stage 1: risk-aware probes for every head of every layer, per fold, and the edited layer.

The probes of a fold are trained once and saved (safetensors); a later run with
the same settings, activations and split reads them back instead. Each fold's
file is trained under its own lock (slim.io.artefact_lock): a run wanting the
probes another run is training waits, then reads them back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import ProbeConfig
from ..data.activations import ProbeData, texts_digest
from ..io import DamagedArtefact, artefact_lock, kill_point, warn_rebuild
from ..layout import RunLayout
from .detector import choose_layer, evaluate_layers
from .probes import RiskAwareProbes, load_probes, save_probes

__all__ = ["FoldProbes", "train_fold_probes", "fit_stage1", "layer_table", "chosen_layers"]


@dataclass
class FoldProbes:
    weight: np.ndarray  # (L, H, d)
    bias: np.ndarray  # (L, H)
    tau: np.ndarray  # (L,) layer detector's vote threshold
    layer_rows: list[dict]  # per-layer validation metrics
    path: Path


def train_fold_probes(
    acts: np.ndarray,
    labels: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    cfg: ProbeConfig,
    path: Path,
    features_id: str,
    device: str = "cpu",
) -> FoldProbes:
    """Probes of every head of every layer for one fold, reused from `path` when it matches.

    Trained under `path`'s lock: a second run (or process) wanting the same file waits for the first and reads
    its probes back (with SLIM_NO_WAIT=1 it stops in one line naming the file)."""
    with artefact_lock(path):  # looked for again once held: the run that held it may have written it
        return _fold_probes(acts, labels, train_rows, val_rows, cfg, Path(path), features_id, device)


def _fold_probes(acts, labels, train_rows, val_rows, cfg: ProbeConfig, path: Path, features_id: str, device: str):
    meta_expected = {
        "config": asdict(cfg),
        "features": features_id,
        "train_rows": texts_digest([str(r) for r in train_rows]),
        "val_rows": texts_digest([str(r) for r in val_rows]),
    }
    if path.exists():
        try:
            weight, bias, tau, meta = load_probes(path)
        except DamagedArtefact as err:
            warn_rebuild(err, "training the probes again.")
        else:
            if {k: meta.get(k) for k in meta_expected} == meta_expected:
                return FoldProbes(weight.numpy(), bias.numpy(), tau.numpy(), meta["layer_rows"], path)
    # sorted rows read the memory-mapped activations in order
    train_rows, val_rows = np.sort(train_rows), np.sort(val_rows)
    X_train = np.asarray(acts[train_rows])  # (N, L, H, d) float16
    X_val = np.asarray(acts[val_rows])
    probes = RiskAwareProbes(
        cfg.loss_type, cfg.bl, cfg.beta, cfg.epochs, cfg.lr, cfg.seed, device=device, checkpoint=cfg.checkpoint
    )
    probes.fit(X_train, labels[train_rows], X_val, labels[val_rows])
    rows = evaluate_layers(probes, X_val, labels[val_rows], bl=cfg.bl)
    L, H, d = X_train.shape[1:]
    weight = np.asarray(probes.coef_, dtype=np.float32).reshape(L, H, d)
    bias = np.asarray(probes.intercept_, dtype=np.float32).reshape(L, H)
    tau = np.array([r["tau"] for r in rows])
    save_probes(
        path,
        weight,
        bias,
        tau,
        meta={**meta_expected, "layer_rows": rows, "best_epoch": np.asarray(probes.best_epoch_).tolist()},
    )
    kill_point("probes")
    return FoldProbes(weight, bias, tau, rows, path)


def fit_stage1(
    data: ProbeData, folds: list[dict], cfg: ProbeConfig, layout: RunLayout, dataset_name: str, device: str = "cpu"
) -> dict[int, FoldProbes]:
    """The probes of every fold, each trained on its train questions and validated on its val questions."""
    labels = data.texts["label"].to_numpy()
    return {
        fold: train_fold_probes(
            data.activations,
            labels,
            data.rows_of(split["train"]),
            data.rows_of(split["val"]),
            cfg,
            layout.probes(fold, dataset_name, cfg),
            data.features_id,
            device=device,
        )
        for fold, split in enumerate(folds)
    }


def layer_table(fold_probes: dict[int, FoldProbes], cfg: ProbeConfig) -> pd.DataFrame:
    """One tidy row per (fold, layer): the layer detector's validation metrics."""
    rows = []
    for fold, fp in fold_probes.items():
        for r in fp.layer_rows:
            rows.append({"fold": fold, "loss_type": cfg.loss_type, "bl": cfg.bl, "beta": cfg.beta, **r})
    cols = [
        "fold",
        "layer",
        "loss_type",
        "bl",
        "beta",
        "acc",
        "f1",
        "tp",
        "tn",
        "fp",
        "fn",
        "fpr",
        "fnr",
        "tau",
        "val_loss",
    ]
    return pd.DataFrame(rows)[cols]


def chosen_layers(fold_probes: dict[int, FoldProbes], criterion: str = "val_loss") -> dict[int, int]:
    """The edited layer of each fold: the layer whose row minimises `criterion` (default FPR + bl * FNR at its
    tau, on the fold's validation rows; see slim.stage1.detector.choose_layer)."""
    return {fold: choose_layer(fp.layer_rows, criterion) for fold, fp in fold_probes.items()}

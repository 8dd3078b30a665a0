"""Figures and tables: the paper's Figure 1 and the comparison table."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_fnr_fpr(metrics: pd.DataFrame, model_name: str, bl: float, path: str | os.PathLike) -> Path:
    """Figure 1(a): FNR and FPR of the layer detector (at its chosen tau) across layers, per fold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for fold, part in metrics.groupby("fold"):
        part = part.sort_values("layer")
        ax.plot(part["layer"], part["fnr"], marker="o", ms=3, label=f"FNR, fold {fold}")
        ax.plot(part["layer"], part["fpr"], marker="s", ms=3, ls="--", label=f"FPR, fold {fold}")
    ax.set_xlabel("layer")
    ax.set_ylabel("rate on validation questions")
    ax.set_title(f"{model_name}: layer detectors (risk-aware probes, bl = {bl:g}, tau chosen on val)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_fnr_by_bl(metrics: pd.DataFrame, model_name: str, path: str | os.PathLike) -> Path:
    """Figure 1(b): FNR across layers for several bl (fold-averaged)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    mean = metrics.groupby(["bl", "layer"], as_index=False)["fnr"].mean()
    for bl, part in mean.groupby("bl"):
        ax.plot(part["layer"], part["fnr"], marker="o", ms=3, label=f"bl = {bl:g}")
    ax.set_xlabel("layer")
    ax.set_ylabel("FNR on validation questions")
    n_folds = metrics["fold"].nunique()
    ax.set_title(f"{model_name}: FNR of the layer detector by bl (mean of {n_folds} folds)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def markdown_table(df: pd.DataFrame, columns: list[str], floatfmt: str = "{:.3f}") -> str:
    """A plain Markdown table (no extra dependency)."""
    head = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    lines = []
    for _, row in df.iterrows():
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in (row[c] for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"

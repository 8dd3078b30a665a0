"""Command-line glue shared by the top-level scripts.

Common flags, the model registry, paths under `validation/`, fold splits and
the cached activations, so every script and every method sees the same data.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from slim.activations import cached_head_activations, load_cached_activations
from slim.data import DATASETS, fold_split, load_truthfulqa, probe_texts, save_fold_splits
from slim.models import DEFAULT_MODEL, MODEL_REGISTRY, LoadedModel, load_model

ROOT = Path(__file__).resolve().parent
VALIDATION_DIR = Path(os.environ.get("SLIM_VALIDATION_DIR", ROOT / "validation"))
PAPER_DIR = ROOT / "paper"


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model_name", nargs="?", default=DEFAULT_MODEL,
                        help=f"registry key ({', '.join(MODEL_REGISTRY)}) or a hub id; default {DEFAULT_MODEL}")
    parser.add_argument("--model_dir", default=None, help="load the model from this local folder instead")
    parser.add_argument("--device", default="auto",
                        help="cpu, auto, cuda[:N] or a GPU index (the published scripts use 0)")
    parser.add_argument("--dataset_name", default="tqa_mc2", choices=DATASETS, help="probe-training texts")
    parser.add_argument("--num_fold", type=int, default=2)
    parser.add_argument("--val_ratio", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42, help="fold split seed")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--tqa_dir", default=None, help="folder holding TruthfulQA.csv (else SLIM_TQA_DIR, "
                                                        "cache, download)")
    parser.add_argument("--out_dir", default=str(VALIDATION_DIR), help="where outputs go")
    return parser


def run_main(main) -> None:
    """Run a script's main; expected failures print one line instead of a traceback."""
    try:
        main()
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        if os.environ.get("SLIM_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def model_tag(args) -> str:
    """A file-name-safe name for the model in output paths."""
    name = args.model_dir.rstrip("/") if args.model_dir else args.model_name
    return Path(name).name if args.model_dir else name.replace("/", "_")


def load_model_from_args(args) -> LoadedModel:
    return load_model(args.model_name, device=args.device, model_dir=args.model_dir)


@dataclass
class ProbeData:
    """Probe texts with their cached activations."""
    texts: pd.DataFrame  # question_idx, text, truthful, label (1 = undesirable)
    activations: np.ndarray  # (N, L, H, d) float16 memory map


def questions_and_splits(args) -> tuple[pd.DataFrame, list[dict[str, np.ndarray]]]:
    """The questions and, per fold, the train/val/test question indices (also saved as CSV)."""
    df = load_truthfulqa(args.tqa_dir)
    save_fold_splits(df, Path(args.out_dir) / "splits", args.num_fold, args.val_ratio, args.seed)
    folds = []
    for fold in range(args.num_fold):
        train, val, test = fold_split(len(df), args.num_fold, fold, args.val_ratio, args.seed)
        folds.append({"train": train, "val": val, "test": test})
    return df, folds


def probe_data(args, lm: LoadedModel | None, df: pd.DataFrame, dataset_name: str | None = None) -> ProbeData:
    """Texts of a probe dataset and their activations (extracted on demand, then cached)."""
    dataset_name = dataset_name or args.dataset_name
    texts = probe_texts(df, dataset_name)
    cache_dir = Path(args.out_dir) / "features"
    acts = load_cached_activations(texts["text"].tolist(), cache_dir, model_tag(args), dataset_name)
    if acts is None:
        lm = lm or load_model_from_args(args)
        acts = cached_head_activations(lm.model, lm.tokenizer, texts["text"].tolist(), cache_dir=cache_dir,
                                       model_name=model_tag(args), dataset_name=dataset_name,
                                       batch_size=args.batch_size, device=lm.device)
    return ProbeData(texts=texts, activations=acts)


def rows_of(texts: pd.DataFrame, question_idx: np.ndarray) -> np.ndarray:
    """Row indices of the probe texts that belong to the given questions."""
    return np.flatnonzero(texts["question_idx"].isin(set(question_idx.tolist())).to_numpy())

"""Question order and the folds' train / val / test splits.

The order is the multiple-choice release's, a seeded shuffle or the CSV's (see slim.data.truthfulqa).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DataConfig, ParameterError
from ..io import write_csv
from .truthfulqa import (
    DataUnavailableError,
    _cache_dir,
    _explicit_location,
    find_truthfulqa_file,
    load_truthfulqa,
    local_truthfulqa_file,
)

log = logging.getLogger(__name__)


def read_mc_questions(path: Path) -> list[str]:
    """The questions of an mc_task.json (a JSON list of {"question": ..., "mc1_targets": ...}), stripped."""
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise ValueError(f"a JSON {type(items).__name__}, not a list of questions")
    return [item["question"].strip() for item in items]


def mc_file_problem(path: Path, csv_questions: list[str]) -> str | None:
    """What keeps `path` from giving the CSV's questions an order (None: nothing), as a phrase after its name."""
    try:
        mc = set(read_mc_questions(path))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        return f"is not TruthfulQA's mc_task.json ({type(err).__name__}: {' '.join(str(err).split())[:100]})"
    missing, unknown = len(set(csv_questions) - mc), len(mc - set(csv_questions))
    if missing or unknown:
        return (
            f"does not hold TruthfulQA.csv's {len(set(csv_questions))} questions "
            f"({missing} missing, {unknown} not in the CSV)"
        )
    return None


def mc_order(csv_questions: list[str], tqa_dir=None, **find_kw) -> np.ndarray:
    """CSV row indices in the order the questions first appear in mc_task.json (found like the CSV)."""

    def verify(path):
        return mc_file_problem(path, csv_questions)

    try:
        path = find_truthfulqa_file("mc_task.json", tqa_dir, verify=verify, **find_kw)
    except DataUnavailableError as err:
        raise DataUnavailableError(f"{str(err).rstrip('.')}; or pass --question_order shuffle.") from None
    problem = mc_file_problem(path, csv_questions)
    if problem:
        raise DataUnavailableError(
            f"{path} {problem}: replace it by TruthfulQA's data/mc_task.json (a cached copy: delete it to download "
            "it again), or pass --question_order shuffle."
        )
    row_of = {q: i for i, q in enumerate(csv_questions)}
    return np.array([row_of[q] for q in dict.fromkeys(read_mc_questions(path))])


def resolve_question_order(question_order: str = "auto", tqa_dir=None) -> str:
    """`auto`: mc when mc_task.json is at hand (explicit folder or cache; no download), else shuffle."""
    if question_order != "auto":
        return question_order
    return "mc" if local_truthfulqa_file("mc_task.json", tqa_dir) else "shuffle"


def question_order(df: pd.DataFrame, cfg: DataConfig) -> np.ndarray:
    """The CSV row indices of all the questions in `cfg.question_order`."""
    order = resolve_question_order(cfg.question_order, cfg.tqa_dir)
    if order == "csv":
        return np.arange(len(df))
    if order == "shuffle":
        if not local_truthfulqa_file("mc_task.json", cfg.tqa_dir):
            log.info("questions in a shuffled order (seed %d), not the published one: %s", cfg.seed, _mc_hint(cfg))
        # A generator apart from the splits' RandomState, so the order and the val draws are independent.
        return np.random.default_rng(cfg.seed).permutation(len(df))
    return mc_order(df["Question"].tolist(), cfg.tqa_dir)


def _mc_hint(cfg: DataConfig) -> str:
    """How to get the published (mc) order, where mc_task.json is looked for."""
    explicit = _explicit_location(cfg.tqa_dir)
    if explicit:
        folder = explicit.parent if explicit.is_file() else explicit
        return f"for that, put TruthfulQA's data/mc_task.json into {folder}."
    return (
        "for that, pass --question_order mc (downloads TruthfulQA's data/mc_task.json once, checked) "
        f"or put that file into {_cache_dir(None)}."
    )


def draw_folds(
    order: np.ndarray, num_fold: int, val_ratio: float = 0.2, seed: int = 42, reseed_each_fold: bool = False
) -> list[dict[str, np.ndarray]]:
    """Per fold, the train / val / test question indices (entries of `order`), as the published scripts draw them.

    Test is the fold-th contiguous part of `order`; the rest is split at random
    into train (1 - val_ratio) and val by one RandomState(seed) whose stream
    runs on from fold to fold (their np.random.seed(seed), then
    np.random.choice per fold). `reseed_each_fold` restarts it at every fold,
    as this project did before (the `csv` order keeps those splits). Each
    split lists its questions in `order`'s order.
    """
    DataConfig(num_fold=num_fold, val_ratio=val_ratio)  # checks both
    order = np.asarray(order)
    parts = np.array_split(np.arange(len(order)), num_fold)  # positions in `order`
    rng = np.random.RandomState(seed)
    folds = []
    for fold in range(num_fold):
        if reseed_each_fold:
            rng = np.random.RandomState(seed)
        rest = np.concatenate([p for i, p in enumerate(parts) if i != fold])
        train = np.sort(rng.choice(rest, size=int(len(rest) * (1 - val_ratio)), replace=False))
        val = np.setdiff1d(rest, train)
        folds.append({"train": order[train], "val": order[val], "test": order[parts[fold]]})
    return folds


def make_folds(order: np.ndarray, cfg: DataConfig) -> list[dict[str, np.ndarray]]:
    """Per fold, the train / val / test question indices of `order` (the questions in cfg's order)."""
    legacy = resolve_question_order(cfg.question_order, cfg.tqa_dir) == "csv"
    return draw_folds(order, cfg.num_fold, cfg.val_ratio, cfg.seed, reseed_each_fold=legacy)


def save_fold_splits(
    df: pd.DataFrame, folds: list[dict[str, np.ndarray]], out_dir: Path, question_order: str, seed: int
) -> dict[int, dict[str, Path]]:
    """Write `fold_{k}_{train,val,test}_seed_{seed}.csv` so every stage and method uses the same questions.

    Rows in the split's order; columns question_idx (the CSV row), question_order, seed, then the CSV's.
    """
    out_dir = Path(out_dir)
    written = {}
    for fold, split in enumerate(folds):
        written[fold] = {}
        for name, rows in split.items():
            part = df.loc[rows].copy()
            for key in ("Correct Answers", "Incorrect Answers"):
                part[key] = part[key].map("; ".join)
            part.insert(0, "seed", seed)
            part.insert(0, "question_order", question_order)
            part.insert(0, "question_idx", rows)
            written[fold][name] = write_csv(part, out_dir / f"fold_{fold}_{name}_seed_{seed}.csv")
    return written


def ordered_questions(cfg: DataConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """The questions (rows in CSV order, indexed by CSV row) and their CSV rows in `cfg.question_order`.

    With `cfg.n_questions`, only the first N of that order, so a quick run mixes question types too.
    """
    df = load_truthfulqa(cfg.tqa_dir)
    order = question_order(df, cfg)
    if cfg.n_questions is not None:
        if cfg.n_questions > len(df):
            raise ParameterError("n_questions", f"must lie in {2 * cfg.num_fold}..{len(df)}, got {cfg.n_questions}.")
        order = order[: cfg.n_questions]
        df = df.loc[np.sort(order)].copy()
    return df, order


def questions_and_folds(
    cfg: DataConfig, splits_dir: str | os.PathLike | None = None
) -> tuple[pd.DataFrame, list[dict[str, np.ndarray]]]:
    """The questions (indexed by CSV row) and their folds; with `splits_dir` the splits are also written there."""
    cfg = replace(cfg, question_order=resolve_question_order(cfg.question_order, cfg.tqa_dir))
    df, order = ordered_questions(cfg)
    folds = make_folds(order, cfg)
    if splits_dir is not None:
        save_fold_splits(df, folds, Path(splits_dir), cfg.question_order, cfg.seed)
    return df, folds

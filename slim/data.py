"""TruthfulQA: finding the files, probe texts and fold splits.

Where the files come from, in order: an explicit file or folder (`--tqa_dir`
or the SLIM_TQA_DIR environment variable), else the user cache, else a
download of the public files, accepted only when its sha256 matches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from .config import DATASETS, DataConfig, ParameterError
from .io import write_csv
from .models import cache_root

log = logging.getLogger(__name__)

# File name in the cache -> (path in the public repository, sha256).
TQA_FILES = {
    "TruthfulQA.csv": ("TruthfulQA.csv", "99d6ae7755e3b435eade956068c9de7c0c474770344237aeb66b56519ba4b697"),
    "finetune_truth.jsonl": (
        "data/finetune_truth.jsonl",
        "8e81d9f0dc592e26fb0d37106126e489d39ac75099828b1f2c8142f3ede60c6b",
    ),
    "finetune_info.jsonl": (
        "data/finetune_info.jsonl",
        "b8e00e379f3aefcdb01b93886e67e0991ca90b5fdd389c0be4be2f5f00c07ec3",
    ),
}
DEFAULT_BASE_URL = "https://raw.githubusercontent.com/sylinrl/TruthfulQA/main/"
# The probe texts: every reference answer after its question (recorded in the activation cache's manifest).
PROBE_TEXT_FORMAT = "Q: {question} A: {answer}"


class DataUnavailableError(RuntimeError):
    """TruthfulQA could not be found, downloaded or verified."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> Path:
    """Fetch `url` into `dest` only if its checksum matches; nothing is left behind otherwise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while block := response.read(1 << 20):
                out.write(block)
        got = sha256_of(Path(tmp))
        if got != sha256:
            raise DataUnavailableError(
                f"{url} failed its checksum (sha256 {got[:12]}..., expected "
                f"{sha256[:12]}...): the copy was discarded; check SLIM_TQA_BASE_URL."
            )
        os.replace(tmp, dest)
        return dest
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DataUnavailableError(
            f"could not download {url} ({reason}): pass --tqa_dir or set SLIM_TQA_DIR "
            "to a folder holding TruthfulQA.csv."
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def find_truthfulqa_file(
    name: str = "TruthfulQA.csv",
    path: str | os.PathLike | None = None,
    base_url: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Path of one TruthfulQA file: explicit path, SLIM_TQA_DIR, cache, or a checked download."""
    if name not in TQA_FILES:
        raise ValueError(f"unknown TruthfulQA file {name!r}: use one of {', '.join(TQA_FILES)}.")
    explicit = path if path is not None else os.environ.get("SLIM_TQA_DIR")
    if explicit:
        explicit = Path(explicit)
        candidate = explicit if explicit.is_file() and explicit.name == name else explicit / name
        if explicit.is_file() and name == "TruthfulQA.csv":
            candidate = explicit  # a CSV passed directly, whatever its file name
        if not candidate.is_file():
            raise DataUnavailableError(
                f"{candidate} does not exist: point --tqa_dir / SLIM_TQA_DIR at the folder holding {name}."
            )
        _warn_if_modified(candidate, TQA_FILES[name][1])
        return candidate
    cache = Path(cache_dir) if cache_dir else cache_root() / "truthfulqa"
    cached = cache / name
    remote_path, sha256 = TQA_FILES[name]
    if cached.is_file():
        if sha256_of(cached) == sha256:
            return cached
        cached.unlink()  # a damaged cache entry is fetched again
    base = base_url or os.environ.get("SLIM_TQA_BASE_URL") or DEFAULT_BASE_URL
    return download_file(base.rstrip("/") + "/" + remote_path, cached, sha256)


_CHECKED: set[Path] = set()


def _warn_if_modified(path: Path, sha256: str) -> None:
    """A file the user points at may be their own version, so it is used; but a copy cut short or edited
    would change every result quietly, so a difference from the published file is said once."""
    if path in _CHECKED:
        return
    _CHECKED.add(path)
    if sha256_of(path) != sha256:
        log.warning(
            "%s differs from the published %s (sha256): results are not comparable with the published data; "
            "point --tqa_dir / SLIM_TQA_DIR at an unmodified copy unless this is meant.",
            path,
            path.name,
        )


def damaged_data(path: Path, err: Exception) -> DataUnavailableError:
    """A TruthfulQA file that does not parse: which file, what is wrong, and how to get a good one."""
    return DataUnavailableError(
        f"{path} is damaged ({type(err).__name__}: {' '.join(str(err).split())[:120]}): delete it to download it "
        "again (when it is the cached copy), or point --tqa_dir / SLIM_TQA_DIR at a good copy."
    )


def split_answers(cell) -> list[str]:
    """Reference answers given as TruthfulQA's "; "-separated string or as a list; blanks dropped."""
    if isinstance(cell, str):
        cell = cell.split("; ")
    elif not isinstance(cell, (list, tuple)):
        return []
    return [a.strip() for a in cell if isinstance(a, str) and a.strip()]


def load_truthfulqa(path=None, **kw) -> pd.DataFrame:
    """The 817 questions in CSV order, answer lists parsed into Python lists."""
    csv = find_truthfulqa_file("TruthfulQA.csv", path, **kw)
    try:
        df = pd.read_csv(csv)
    except (ValueError, UnicodeDecodeError) as err:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise damaged_data(csv, err) from None
    missing = {"Question", "Best Answer", "Correct Answers", "Incorrect Answers"} - set(df.columns)
    if missing:
        raise DataUnavailableError(f"{csv} is not the TruthfulQA CSV (missing columns {sorted(missing)}).")
    df["Question"] = df["Question"].str.strip()  # one question carries a trailing space
    df["Correct Answers"] = df["Correct Answers"].map(split_answers)
    df["Incorrect Answers"] = df["Incorrect Answers"].map(split_answers)
    return df.reset_index(drop=True)


def format_qa(question: str, answer: str) -> str:
    return PROBE_TEXT_FORMAT.format(question=question, answer=answer)


def probe_texts(df: pd.DataFrame, dataset_name: str = "tqa_mc2", seed: int = 0) -> pd.DataFrame:
    """Texts whose last-token activations train the probes.

    tqa_mc2: every reference answer of every question, `Q: {q} A: {a}`.
    tqa_gen_end_q: the same followed by ` Q: {a random other question}`
    (ITI's tuning set for the projection std).
    Columns: question_idx, text, truthful (1/0), label (1 = undesirable).
    """
    if dataset_name not in DATASETS:
        raise ValueError(f"unknown dataset {dataset_name!r}: use one of {', '.join(DATASETS)}.")
    rng = np.random.RandomState(seed)
    rows = []
    n = len(df)
    for q_idx, row in df.iterrows():
        for truthful, key in ((1, "Correct Answers"), (0, "Incorrect Answers")):
            for answer in row[key]:
                text = format_qa(row["Question"], answer)
                if dataset_name == "tqa_gen_end_q":
                    other = (q_idx + 1 + rng.randint(n - 1)) % n  # any question but this one
                    text = f"{text} Q: {df.at[other, 'Question']}"
                rows.append((q_idx, text, truthful, 1 - truthful))
    return pd.DataFrame(rows, columns=["question_idx", "text", "truthful", "label"])


def fold_split(
    n_questions: int, num_fold: int, fold: int, val_ratio: float = 0.2, seed: int = 42
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) question indices of one fold, as the published scripts draw them.

    Test is the fold-th contiguous part of the questions; the rest is split at
    random into train (1 - val_ratio) and val.
    """
    DataConfig(num_fold=num_fold, val_ratio=val_ratio)  # checks both
    if not 0 <= fold < num_fold:
        raise ValueError(f"fold {fold} is out of range for num_fold {num_fold}.")
    parts = np.array_split(np.arange(n_questions), num_fold)
    test = parts[fold]
    rest = np.concatenate([p for i, p in enumerate(parts) if i != fold])
    rng = np.random.RandomState(seed)
    train = np.sort(rng.choice(rest, size=int(len(rest) * (1 - val_ratio)), replace=False))
    val = np.setdiff1d(rest, train)
    return train, val, test


def save_fold_splits(
    df: pd.DataFrame, out_dir: Path, num_fold: int, val_ratio: float = 0.2, seed: int = 42
) -> dict[int, dict[str, Path]]:
    """Write `fold_{k}_{train,val,test}_seed_{seed}.csv` so every stage and method uses the same questions."""
    out_dir = Path(out_dir)
    written = {}
    for fold in range(num_fold):
        idx = dict(zip(("train", "val", "test"), fold_split(len(df), num_fold, fold, val_ratio, seed)))
        written[fold] = {}
        for split, rows in idx.items():
            part = df.iloc[rows].copy()
            part.insert(0, "question_idx", rows)
            for key in ("Correct Answers", "Incorrect Answers"):
                part[key] = part[key].map("; ".join)
            written[fold][split] = write_csv(part, out_dir / f"fold_{fold}_{split}_seed_{seed}.csv")
    return written


def load_questions(cfg: DataConfig) -> pd.DataFrame:
    """TruthfulQA's questions, or the first `cfg.n_questions` of them."""
    df = load_truthfulqa(cfg.tqa_dir)
    if cfg.n_questions is not None:
        if cfg.n_questions > len(df):
            raise ParameterError("n_questions", f"must lie in {2 * cfg.num_fold}..{len(df)}, got {cfg.n_questions}.")
        df = df.iloc[: cfg.n_questions].copy()
    return df


def make_folds(n_questions: int, cfg: DataConfig) -> list[dict[str, np.ndarray]]:
    """Per fold, the train / val / test question indices."""
    folds = []
    for fold in range(cfg.num_fold):
        train, val, test = fold_split(n_questions, cfg.num_fold, fold, cfg.val_ratio, cfg.seed)
        folds.append({"train": train, "val": val, "test": test})
    return folds


def questions_and_folds(
    cfg: DataConfig, splits_dir: str | os.PathLike | None = None
) -> tuple[pd.DataFrame, list[dict[str, np.ndarray]]]:
    """The questions and their folds; with `splits_dir` the splits are also written there as CSV."""
    df = load_questions(cfg)
    if splits_dir is not None:
        save_fold_splits(df, Path(splits_dir), cfg.num_fold, cfg.val_ratio, cfg.seed)
    return df, make_folds(len(df), cfg)

"""TruthfulQA: finding the files, probe texts, question order and fold splits.

Where the files come from, in order: an explicit file or folder (`--tqa_dir`
or the SLIM_TQA_DIR environment variable), else the user cache, else a
download of the public files, accepted only when its sha256 matches (or, for
mc_task.json, whose digest is not pinned, when its questions are the CSV's).

Question order: the published scripts sort the CSV's questions into the
multiple-choice release's order (data/mc_task.json, which interleaves the
Adversarial and Non-Adversarial questions) before cutting the folds; the
CSV's own order puts nearly all Adversarial questions in fold 0's test part.
Questions keep their CSV row index (`question_idx`) whatever the order: only
which fold they fall in changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
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
# Files without a pinned sha256 (none could be checked offline): a download is kept only when the check its
# reader passes as `verify` accepts it (mc_task.json: its questions are the CSV's, see mc_order).
TQA_CONTENT_CHECKED = {"mc_task.json": "data/mc_task.json"}
DEFAULT_BASE_URL = "https://raw.githubusercontent.com/sylinrl/TruthfulQA/main/"
# The probe texts: every reference answer after its question, closed like the published multiple-choice
# choices ("... in area."), so the probed last token is the final punctuation. The activation cache's
# manifest records this string: a change of format (or of its placeholder's rule) is a new cache.
PROBE_TEXT_FORMAT = "Q: {question} A: {answer_with_final_punctuation}"
# An answer already closed: . ! ? or an ellipsis, perhaps inside closing quotes or brackets ('"goat."').
_CLOSED = re.compile(r"""[.!?\u2026]["'\u2019\u201d)\]]*$""")


class DataUnavailableError(RuntimeError):
    """TruthfulQA could not be found, downloaded or verified."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: Path,
    sha256: str | None,
    timeout: float = 30.0,
    verify: Callable[[Path], str | None] | None = None,
) -> Path:
    """Fetch `url` into `dest` only if it passes its checks; nothing is left behind otherwise.

    The checks: its sha256 (when pinned), then `verify(path)`, which returns what is wrong or None.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while block := response.read(1 << 20):
                out.write(block)
        problem = _checksum_problem(Path(tmp), sha256) or (verify(Path(tmp)) if verify else None)
        if problem:
            raise DataUnavailableError(f"{url} {problem}: the copy was discarded; check SLIM_TQA_BASE_URL.")
        os.replace(tmp, dest)
        return dest
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DataUnavailableError(
            f"could not download {url} ({reason}): pass --tqa_dir or set SLIM_TQA_DIR to a folder holding {dest.name}."
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _checksum_problem(path: Path, sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    got = sha256_of(path)
    return None if got == sha256 else f"failed its checksum (sha256 {got[:12]}..., expected {sha256[:12]}...)"


def find_truthfulqa_file(
    name: str = "TruthfulQA.csv",
    path: str | os.PathLike | None = None,
    base_url: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    verify: Callable[[Path], str | None] | None = None,
) -> Path:
    """Path of one TruthfulQA file: explicit path, SLIM_TQA_DIR, cache, or a checked download.

    `verify(path)` (what is wrong, or None) also checks a download, for files without a pinned sha256.
    """
    remote_path, sha256 = _published(name)
    if sha256 is None and verify is None:
        raise ValueError(f"{name} has no pinned sha256: pass verify= to check what is downloaded.")
    explicit = _explicit_location(path)
    if explicit:
        candidate = _explicit_candidate(explicit, name)
        if not candidate.is_file():
            raise DataUnavailableError(
                f"{candidate} does not exist: point --tqa_dir / SLIM_TQA_DIR at the folder holding {name}."
            )
        if sha256:
            _warn_if_modified(candidate, sha256)
        return candidate
    cached = _cache_dir(cache_dir) / name
    if cached.is_file():
        if sha256 is None or sha256_of(cached) == sha256:
            return cached  # an unpinned file is checked by its reader, whose error says to delete a bad copy
        cached.unlink()  # a damaged cache entry is fetched again
    base = base_url or os.environ.get("SLIM_TQA_BASE_URL") or DEFAULT_BASE_URL
    return download_file(base.rstrip("/") + "/" + remote_path, cached, sha256, verify=verify)


def _published(name: str) -> tuple[str, str | None]:
    """(path in the public repository, pinned sha256 or None) of a TruthfulQA file."""
    if name in TQA_FILES:
        return TQA_FILES[name]
    if name in TQA_CONTENT_CHECKED:
        return TQA_CONTENT_CHECKED[name], None
    known = [*TQA_FILES, *TQA_CONTENT_CHECKED]
    raise ValueError(f"unknown TruthfulQA file {name!r}: use one of {', '.join(known)}.")


def local_truthfulqa_file(
    name: str, path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> Path | None:
    """Where `find_truthfulqa_file` would find `name` without downloading (explicit folder or cache), or None."""
    explicit = _explicit_location(path)
    candidate = _explicit_candidate(explicit, name) if explicit else _cache_dir(cache_dir) / name
    return candidate if candidate.is_file() else None


def _explicit_location(path) -> Path | None:
    explicit = path if path is not None else os.environ.get("SLIM_TQA_DIR")
    return Path(explicit) if explicit else None


def _cache_dir(cache_dir) -> Path:
    return Path(cache_dir) if cache_dir else cache_root() / "truthfulqa"


def _explicit_candidate(explicit: Path, name: str) -> Path:
    """`name` under an explicit file or folder: the file itself (any CSV passed directly), else the folder's
    `name`, else its path in a clone of the public repository (data/mc_task.json)."""
    if explicit.is_file():
        if explicit.name == name or name == "TruthfulQA.csv":
            return explicit
        explicit = explicit.parent  # a CSV passed directly: the other files sit beside it
    flat, in_clone = explicit / name, explicit / _published(name)[0]
    return in_clone if in_clone.is_file() and not flat.is_file() else flat


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


def with_final_punctuation(answer: str) -> str:
    """The answer closed by a period unless it already ends in . ! ? (perhaps inside closing quotes/brackets)."""
    answer = answer.strip()
    return answer if _CLOSED.search(answer) else answer + "."


PLAIN_TEXT_FORMAT = "Q: {question} A: {answer}"  # tqa_mc2_plain: the answer as the CSV has it


def format_qa(question: str, answer: str, final_period: bool = True) -> str:
    if not final_period:
        return PLAIN_TEXT_FORMAT.format(question=question, answer=answer.strip())
    return PROBE_TEXT_FORMAT.format(question=question, answer_with_final_punctuation=with_final_punctuation(answer))


def text_format(dataset_name: str) -> str:
    """The format of a probe dataset's texts, as the activation cache's manifest records it."""
    return PLAIN_TEXT_FORMAT if dataset_name == "tqa_mc2_plain" else PROBE_TEXT_FORMAT


def probe_texts(df: pd.DataFrame, dataset_name: str = "tqa_mc2", seed: int = 0) -> pd.DataFrame:
    """Texts whose last-token activations train the probes.

    tqa_mc2: every reference answer of every question, `Q: {q} A: {a}.` (PROBE_TEXT_FORMAT).
    tqa_gen_end_q: the same followed by ` Q: {a random other question}`
    (ITI's tuning set for the projection std).
    tqa_mc2_plain: tqa_mc2 without the closing period (an ablation of it).
    `df`'s index is the question_idx (the CSV row). Columns: question_idx,
    text, truthful (1/0), label (1 = undesirable).
    """
    if dataset_name not in DATASETS:
        raise ValueError(f"unknown dataset {dataset_name!r}: use one of {', '.join(DATASETS)}.")
    rng = np.random.RandomState(seed)
    rows = []
    questions = df["Question"].tolist()
    n = len(df)
    for pos, (q_idx, row) in enumerate(df.iterrows()):
        for truthful, key in ((1, "Correct Answers"), (0, "Incorrect Answers")):
            for answer in row[key]:
                text = format_qa(row["Question"], answer, final_period=dataset_name != "tqa_mc2_plain")
                if dataset_name == "tqa_gen_end_q":
                    other = (pos + 1 + rng.randint(n - 1)) % n  # any question but this one (by position)
                    text = f"{text} Q: {questions[other]}"
                rows.append((q_idx, text, truthful, 1 - truthful))
    return pd.DataFrame(rows, columns=["question_idx", "text", "truthful", "label"])


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

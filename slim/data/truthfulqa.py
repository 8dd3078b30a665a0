"""TruthfulQA: finding, downloading and checking the files, and reading the questions.

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
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from ..models.loading import cache_root

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

"""NQ-open for the transfer experiment: finding and loading the questions and gold answers, and the lenient gold
match.

Where the questions come from, first found first: `--nq_file`, the environment variable SLIM_NQ_FILE, the cache
(`$SLIM_CACHE/nq_open/NQ-open.dev.jsonl`), then Hugging Face's `nq_open` through `datasets` (online).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import string
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import check_int
from ..io import sha256_file
from ..models.loading import cache_root

log = logging.getLogger(__name__)

NQ_DATASET = "nq_open"  # the Hugging Face dataset (Lee et al., 2019's open-domain split of Natural Questions)
NQ_FORMAT = (
    "one record per question with `question` (text) and `answer` (a list of gold answers), as Hugging Face's nq_open"
)
NQ_ENV = "SLIM_NQ_FILE"  # names a local NQ-open file when --nq_file is not given
# The published dev split (google-research-datasets/natural-questions, nq_open/NQ-open.dev.jsonl; CC BY-SA 3.0),
# which Hugging Face's nq_open calls validation: what the cache holds and what the paper's section 5.2 used.
NQ_DEV_FILE = "NQ-open.dev.jsonl"
NQ_DEV_SHA256 = "f15567f38099f3615f5b8a685c0aef449c11ad90d3da3735e8d1b98115b40616"
NQ_DEV_RECORDS = 3610


class TransferUnavailable(RuntimeError):
    """NQ-open could not be had: no local file was found and the `datasets` package or the hub is not at hand."""


# ---------------------------------------------------------------------------------------------
# Finding the data


def nq_cache_file() -> Path:
    """Where the cached copy of the NQ-open dev split is looked for: `$SLIM_CACHE/nq_open/NQ-open.dev.jsonl`."""
    return cache_root() / "nq_open" / NQ_DEV_FILE


def _fix(origin: str) -> str:
    """What to do about a bad file, by where it was named."""
    if origin == NQ_ENV:
        return f"point {NQ_ENV} at a file of NQ-open questions ({NQ_FORMAT}), or unset it"
    if origin == "cache":
        return f"delete it and copy {NQ_DEV_FILE} there again, or pass --nq_file / set {NQ_ENV}"
    return f"pass --nq_file a file of NQ-open questions ({NQ_FORMAT})"


def _named(value, origin: str) -> Path:
    path = Path(value).expanduser().resolve()
    if path.is_dir() and (path / NQ_DEV_FILE).is_file():  # the folder holding the published file
        path = path / NQ_DEV_FILE
    if not path.is_file():
        raise ValueError(f"{origin} names {path}, which does not exist: {_fix(origin)}.")
    return path


def find_nq_file(path=None) -> tuple[Path, str] | None:
    """The local NQ-open file and how it was found ("--nq_file", "SLIM_NQ_FILE" or "cache"), first found first:
    `path`, the environment variable SLIM_NQ_FILE, the cache (`nq_cache_file`); None when none is given (an empty
    value counts as not given). One-line ValueError, naming the flag or variable, for a path that does not exist."""
    if path is not None and str(path).strip():
        return _named(path, "--nq_file"), "--nq_file"
    if os.environ.get(NQ_ENV, "").strip():
        return _named(os.environ[NQ_ENV].strip(), NQ_ENV), NQ_ENV
    cached = nq_cache_file()
    return (cached, "cache") if cached.is_file() else None


# ---------------------------------------------------------------------------------------------
# Reading it


def _answers_cell(value) -> list[str]:
    """A record's gold answers as a list of stripped strings: a list (or array), a JSON or Python list written as
    text (CSV), or one answer as text."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            for parse in (json.loads, ast.literal_eval):
                try:
                    return _answers_cell(list(parse(text)))
                except (ValueError, SyntaxError, TypeError):
                    continue
        value = [text]
    if hasattr(value, "tolist"):  # numpy arrays (parquet)
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise TypeError("`answer` is not a list of strings")
    return [a.strip() for a in value if a.strip()]


def _records_of_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except ImportError as err:
            raise OSError(f"reading parquet needs pyarrow ({err}): pip install pyarrow, or use JSONL") from None
    if suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False, dtype=str)
    text = path.read_text(encoding="utf-8")
    try:  # a JSON document: a list of records, {"data": [...]}, or columns {"question": [...], "answer": [...]}
        doc = json.loads(text)
    except ValueError:  # JSON Lines (also what Hugging Face's to_json writes under .json)
        doc = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    doc.append(json.loads(line))
                except ValueError as err:  # a line cut short or edited: say which
                    raise ValueError(f"line {number} is not JSON ({err})") from None
    if isinstance(doc, dict):
        doc = doc.get("data", doc)
    if isinstance(doc, dict) and isinstance(doc.get("question"), str):  # one record (a JSON Lines file of one line)
        doc = [doc]
    return pd.DataFrame(doc)


def _read_nq_file(path: Path, origin: str, sha256: str) -> pd.DataFrame:
    """The checked records of a local file; one-line ValueError naming `origin` (the flag, the variable or the
    cache) and what to do. A cached copy must be the published dev split; a file the user names may be their own,
    but one named like the dev split that differs from it is said once."""
    where = {"--nq_file": f"--nq_file {path}", NQ_ENV: f"{NQ_ENV}={path}"}.get(
        origin, f"the cached NQ-open file {path}"
    )
    if sha256 != NQ_DEV_SHA256 and path.name == NQ_DEV_FILE:
        if origin == "cache":
            raise ValueError(
                f"{where} is damaged (sha256 {sha256[:12]}..., the published {NQ_DEV_FILE} has "
                f"{NQ_DEV_SHA256[:12]}...): {_fix(origin)}."
            )
        log.warning(
            "%s differs from the published %s (sha256 %s..., not %s...): its results are not the dev split's; "
            "point %s at an unmodified copy unless this is meant.",
            where,
            NQ_DEV_FILE,
            sha256[:12],
            NQ_DEV_SHA256[:12],
            origin,
        )
    try:
        raw = _records_of_file(path)
    except (ValueError, OSError, TypeError) as err:
        raise ValueError(
            f"{where} could not be read ({type(err).__name__}: {str(err)[:200]}): {_fix(origin)}."
        ) from None
    return _checked_records(raw, where, _fix(origin))


def _checked_records(raw: pd.DataFrame, where: str, fix: str = NQ_FORMAT) -> pd.DataFrame:
    """question_idx (the record's row), Question, golds; one-line ValueError naming the first bad record."""
    missing = [c for c in ("question", "answer") if c not in raw.columns]
    if missing:
        raise ValueError(f"{where} has no {' or '.join(missing)} field: {fix}.")
    questions, golds = [], []
    for i, (q, a) in enumerate(zip(raw["question"], raw["answer"])):
        try:
            if not isinstance(q, str) or not q.strip():
                raise TypeError("`question` is not a non-empty text")
            answers = _answers_cell(a)
            if not answers:
                raise TypeError("`answer` holds no gold answer")
        except TypeError as err:
            raise ValueError(f"{where}: record {i}: {err}: {fix}.") from None
        questions.append(q.strip())
        golds.append(answers)
    if not questions:
        raise ValueError(f"{where} holds no question: {fix}.")
    return pd.DataFrame({"question_idx": np.arange(len(questions)), "Question": questions, "golds": golds})


def _load_hub(split: str) -> pd.DataFrame:
    none_local = f"no --nq_file was given, {NQ_ENV} is not set and {nq_cache_file()} does not exist"
    try:
        from datasets import load_dataset
    except ImportError:
        raise TransferUnavailable(
            f"{none_local}, and the `datasets` package is not installed, so {NQ_DATASET} cannot be loaded"
        ) from None
    try:
        ds = load_dataset(NQ_DATASET, split=split)
    except Exception as err:  # offline, unknown split, hub errors: all mean the data cannot be had here
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise TransferUnavailable(f"{none_local}, and {NQ_DATASET} ({split}) could not be loaded ({reason})") from None
    return _checked_records(pd.DataFrame({"question": ds["question"], "answer": ds["answer"]}), NQ_DATASET)


def load_nq_open(path=None, split: str = "validation", n: int | None = None, seed: int = 0) -> pd.DataFrame:
    """NQ-open questions and their gold answers: columns question_idx (the record's row in the source),
    Question, golds (list of str), in source order.

    From the first of: `path` (--nq_file), the file SLIM_NQ_FILE names, the cache (`nq_cache_file`) (JSONL, JSON,
    CSV with the answer list as JSON or Python text, or parquet; NQ_FORMAT), else online through
    `datasets.load_dataset("nq_open", split=split)`; TransferUnavailable (one line) when none can be had. With `n`,
    the first n records of a permutation seeded by `seed` (kept in source order). `df.attrs["source"]` says where
    the records came from: {"file", "sha256", "bytes", "dev_split"} or {"dataset", "split"}, with "found_by"
    ("--nq_file", "SLIM_NQ_FILE", "cache" or "online"), the record count and the subset.
    """
    if n is not None:
        n = check_int("max_questions", n, 1)
    found = find_nq_file(path)
    if found is not None:
        path, origin = found
        sha256 = sha256_file(path)
        df = _read_nq_file(path, origin, sha256)
        source = {"file": str(path), "sha256": sha256, "bytes": path.stat().st_size, "found_by": origin}
        source["dev_split"] = sha256 == NQ_DEV_SHA256  # the published NQ-open dev split, byte for byte
    else:
        df = _load_hub(split)
        source = {"dataset": NQ_DATASET, "split": split, "found_by": "online"}
    source["records"] = len(df)
    if n is not None and n < len(df):
        keep = np.sort(np.random.default_rng(seed).permutation(len(df))[:n])
        df = df.iloc[keep].reset_index(drop=True)
        source["subset"] = {"n": n, "seed": seed, "rule": "the first n of a seeded permutation (numpy default_rng)"}
    df.attrs["source"] = source
    return df


def data_key(source: dict) -> str:
    """A file-name-safe key of the data the answers are cached under: `file-<sha256 12 hex>` or `nq_open-<split>`."""
    if "sha256" in source:
        return f"file-{source['sha256'][:12]}"
    return f"{source['dataset']}-{re.sub(r'[^A-Za-z0-9._-]+', '_', source['split'])}"


# ---------------------------------------------------------------------------------------------
# Gold match

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation removed (ASCII and Unicode), the articles a / an /
    the removed, whitespace collapsed to single spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def gold_match(answer: str, golds) -> bool:
    """Whether any gold answer occurs in the answer, both normalised (`normalize_answer`), as whole words.

    This is containment, not exact match: the lenient convention used for NQ-open when the model generates
    free text (a sentence that contains the gold answer counts). Whole words: the gold "1" does not occur in
    "1955", nor "paris" in "comparison". A gold answer that normalises to nothing never matches.
    """
    said = f" {normalize_answer(answer)} "
    for gold in [golds] if isinstance(golds, str) else golds:
        norm = normalize_answer(gold)
        if norm and f" {norm} " in said:
            return True
    return False

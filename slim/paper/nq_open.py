"""NQ-open for the transfer experiment: loading the questions and gold answers, and the lenient gold match."""

from __future__ import annotations

import ast
import json
import re
import string
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import ParameterError, check_int
from ..io import sha256_file

NQ_DATASET = "nq_open"  # the Hugging Face dataset (Lee et al., 2019's open-domain split of Natural Questions)
NQ_FORMAT = (
    "one record per question with `question` (text) and `answer` (a list of gold answers), as Hugging Face's nq_open"
)


class TransferUnavailable(RuntimeError):
    """NQ-open could not be had: no file was given and the `datasets` package or the hub is not at hand."""


# ---------------------------------------------------------------------------------------------
# The data


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
            raise ParameterError(
                "nq_file", f"{path}: reading parquet needs pyarrow ({err}): pip install pyarrow, or pass JSONL."
            ) from None
    if suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False, dtype=str)
    text = path.read_text(encoding="utf-8")
    try:  # a JSON document: a list of records, {"data": [...]}, or columns {"question": [...], "answer": [...]}
        doc = json.loads(text)
    except ValueError:  # JSON Lines (also what Hugging Face's to_json writes under .json)
        doc = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(doc, dict):
        doc = doc.get("data", doc)
    if isinstance(doc, dict) and isinstance(doc.get("question"), str):  # one record (a JSON Lines file of one line)
        doc = [doc]
    return pd.DataFrame(doc)


def _read_nq_file(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ParameterError("nq_file", f"{path} does not exist: pass a file of NQ-open questions ({NQ_FORMAT}).")
    try:
        raw = _records_of_file(path)
    except ParameterError:
        raise
    except (ValueError, OSError, TypeError) as err:
        raise ValueError(f"{path} could not be read ({type(err).__name__}: {str(err)[:200]}): {NQ_FORMAT}.") from None
    return _checked_records(raw, str(path))


def _checked_records(raw: pd.DataFrame, where: str) -> pd.DataFrame:
    """question_idx (the record's row), Question, golds; one-line ValueError naming the first bad record."""
    missing = [c for c in ("question", "answer") if c not in raw.columns]
    if missing:
        raise ValueError(f"{where} has no {' or '.join(missing)} field: {NQ_FORMAT}.")
    questions, golds = [], []
    for i, (q, a) in enumerate(zip(raw["question"], raw["answer"])):
        try:
            if not isinstance(q, str) or not q.strip():
                raise TypeError("`question` is not a non-empty text")
            answers = _answers_cell(a)
            if not answers:
                raise TypeError("`answer` holds no gold answer")
        except TypeError as err:
            raise ValueError(f"{where}: record {i}: {err}: {NQ_FORMAT}.") from None
        questions.append(q.strip())
        golds.append(answers)
    if not questions:
        raise ValueError(f"{where} holds no question: {NQ_FORMAT}.")
    return pd.DataFrame({"question_idx": np.arange(len(questions)), "Question": questions, "golds": golds})


def _load_hub(split: str) -> pd.DataFrame:
    try:
        from datasets import load_dataset
    except ImportError:
        raise TransferUnavailable(
            f"no --nq_file was given and the `datasets` package is not installed, so {NQ_DATASET} cannot be loaded"
        ) from None
    try:
        ds = load_dataset(NQ_DATASET, split=split)
    except Exception as err:  # offline, unknown split, hub errors: all mean the data cannot be had here
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise TransferUnavailable(
            f"no --nq_file was given and {NQ_DATASET} ({split}) could not be loaded ({reason})"
        ) from None
    return _checked_records(pd.DataFrame({"question": ds["question"], "answer": ds["answer"]}), NQ_DATASET)


def load_nq_open(path=None, split: str = "validation", n: int | None = None, seed: int = 0) -> pd.DataFrame:
    """NQ-open questions and their gold answers: columns question_idx (the record's row in the source),
    Question, golds (list of str), in source order.

    From `path` (JSONL, JSON, CSV with the answer list as JSON or Python text, or parquet; NQ_FORMAT) or, without
    one, `datasets.load_dataset("nq_open", split=split)`; TransferUnavailable (one line) when that cannot be had.
    With `n`, the first n records of a permutation seeded by `seed` (kept in source order). `df.attrs["source"]`
    says where the records came from: {"file", "sha256", "bytes"} or {"dataset", "split"}, with the record count
    and the subset.
    """
    if n is not None:
        n = check_int("max_questions", n, 1)
    if path is not None:
        path = Path(path).expanduser().resolve()
        df = _read_nq_file(path)
        source = {"file": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
    else:
        df = _load_hub(split)
        source = {"dataset": NQ_DATASET, "split": split}
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

"""Labelled data for the offline judges.

TruthfulQA's human judge labels and reference answers, and the project's labelled answers of its own model.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import KIND_SUFFIX, _check_kind

log = logging.getLogger(__package__)  # "slim.judges", as before the package split


@dataclass
class References:
    best: str
    correct: list[str]
    incorrect: list[str]


def load_references(tqa_dir=None) -> dict[str, References]:
    """TruthfulQA's reference answers by (stripped) question."""
    from ..data.truthfulqa import load_truthfulqa

    df = load_truthfulqa(tqa_dir)
    return {
        q: References(str(b).strip(), list(c), list(i))
        for q, b, c, i in zip(df["Question"], df["Best Answer"], df["Correct Answers"], df["Incorrect Answers"])
    }


def load_judge_data(kind: str, tqa_dir=None) -> tuple[list[str], list[str], np.ndarray, Path]:
    """(questions, answers, labels, file) of TruthfulQA's human-labelled judge data for `kind`."""
    from ..data.truthfulqa import damaged_data, find_truthfulqa_file

    path = find_truthfulqa_file(f"finetune_{_check_kind(kind)}.jsonl", tqa_dir)
    suffix = "\n" + KIND_SUFFIX[kind]
    questions, answers, labels = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                body, completion = row["prompt"], row["completion"]
            except (ValueError, KeyError, TypeError) as err:
                raise damaged_data(path, err) from None
            if not (body.startswith("Q: ") and body.endswith(suffix) and "\nA: " in body):
                raise ValueError(f"{path} has a row that is not 'Q: ..\\nA: ..{suffix!r}': is it the {kind} file?")
            q, _, a = body[3 : -len(suffix)].partition("\nA: ")
            questions.append(q.strip())
            answers.append(a.strip())
            labels.append(completion.strip() == "yes")
    return questions, answers, np.array(labels), path


LABELS_ENV = "SLIM_JUDGE_LABELS"
LABELS_FILE = "smollm2_135M_labels.csv"
PROJECT_LABELS = Path(__file__).resolve().parents[2] / "data" / "judge-labels" / LABELS_FILE
LABEL_COLUMNS = ("question", "answer", "truthful", "informative")


def judge_labels_path(path=None) -> Path:
    """The labelled answers' CSV: `path` (a file, or a folder holding smollm2_135M_labels.csv); else the
    project's copy, data/judge-labels/; else, where that is absent (an installed package), SLIM_JUDGE_LABELS."""
    if path is None:
        path = PROJECT_LABELS if PROJECT_LABELS.is_file() else os.environ.get(LABELS_ENV) or PROJECT_LABELS
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILE
    if not path.is_file():
        raise ValueError(
            f"judge labels {path} do not exist: pass a labels CSV, or set {LABELS_ENV} to one (or to its "
            "folder), e.g. a copy of the project's data/judge-labels/."
        )
    return path


def load_judge_labels(path=None, allow_skipped: bool = False):
    """Labelled answers as a DataFrame: question, answer, truthful, informative (1 / 0) and any other columns.

    Reads `judge_labels_path(path)`: by default the project's copy of the
    SmolLM2-135M labels (data/judge-labels/, see its README and PROTOCOL).
    Questions are stripped, missing answers read as "". With
    `allow_skipped`, a blank label is a skipped item (slim.judges.audit writes
    those) and the label columns are nullable integers; otherwise every row
    must carry both labels. A file without these columns, or with a label
    other than 0 / 1, raises a one-line ValueError naming it.
    """
    import pandas as pd

    path = judge_labels_path(path)
    todo = f"pass a CSV with columns {', '.join(LABEL_COLUMNS)} (1 / 0), like data/judge-labels/{LABELS_FILE}."
    try:
        df = pd.read_csv(path, dtype={"question": str, "answer": str}, keep_default_na=False, na_values=[""])
    except (ValueError, UnicodeDecodeError) as err:  # pandas' ParserError and EmptyDataError are ValueErrors
        problem = f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"
        raise ValueError(f"{path} does not parse ({problem}): {todo}") from None
    missing = [c for c in LABEL_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a labels file (no column {', '.join(missing)}): {todo}")
    df["question"] = df["question"].fillna("").astype(str).str.strip()
    df["answer"] = df["answer"].fillna("").astype(str)
    for col in ("truthful", "informative"):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = (df[col].notna() & ~values.isin([0, 1])) | (df[col].isna() & (not allow_skipped))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            value = "blank" if pd.isna(df[col].iloc[row]) else repr(df[col].iloc[row])
            raise ValueError(f"{path} row {row + 1} (after the header): {col} is {value}, not 1 or 0: {todo}")
        df[col] = values.astype("Int64") if allow_skipped else values.astype(int)
    return df

"""The probe texts: each reference answer after its question, closed by final punctuation, labelled truthful or not."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd

from ..config import DATASETS

log = logging.getLogger(__name__)


# The probe texts: every reference answer after its question, closed like the published multiple-choice
# choices ("... in area."), so the probed last token is the final punctuation. The activation cache's
# manifest records this string: a change of format (or of its placeholder's rule) is a new cache.
PROBE_TEXT_FORMAT = "Q: {question} A: {answer_with_final_punctuation}"
# An answer already closed: . ! ? or an ellipsis, perhaps inside closing quotes or brackets ('"goat."').
_CLOSED = re.compile(r"""[.!?\u2026]["'\u2019\u201d)\]]*$""")


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

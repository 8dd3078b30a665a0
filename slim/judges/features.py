"""What the offline judge sees of an answer: its similarity to TruthfulQA's references and a few surface features."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import DamagedArtefact, atomic_path, reading, warn_rebuild
from .labels import References

log = logging.getLogger(__package__)  # "slim.judges", as before the package split


FEATURE_VERSION = "3"
_TOKEN = re.compile(r"[a-z0-9]+")
_NEGATION = re.compile(r"\b(no|not|never|nothing|none|nobody|nowhere|cannot)\b|n't\b")
REFUSAL_RE = re.compile(
    r"no comment|i don't know|i do not know|not sure|unknown|cannot answer|can't answer|"
    r"cannot say|can't say|no way to know|impossible to (know|say)",
    re.I,
)
FEATURE_NAMES = (
    # answer vs the question's references (MiniLM cosines, word overlap, yes/no and negation agreement)
    "cos_correct_max",
    "cos_correct_mean",
    "cos_incorrect_max",
    "cos_incorrect_mean",
    "cos_max_diff",
    "sem_q",
    "cos_best",
    "jac_correct_max",
    "jac_correct_mean",
    "jac_incorrect_max",
    "jac_incorrect_mean",
    "jac_max_diff",
    "yesno_x_correct",
    "yesno_x_incorrect",
    "neg_x_correct",
    "neg_x_incorrect",
    "neg_correct_minus_incorrect",
    "no_references",
    # answer alone and against the question (informativeness)
    "cos_question",
    "share_words_in_question",
    "log_new_words",
    "log_chars",
    "log_words",
    "refusal",
    "empty",
    "yesno",
    "n_negations",
    "ends_with_question_mark",
)


class EmbeddingStore:
    """Unit sentence embeddings cached on disk by text hash (embedding is the slow part of training)."""

    chunk = 4096

    def __init__(self, embedder_name: str, path: Path | None, embedder=None):
        self.embedder_name = embedder_name
        self.path = path
        self._embedder = embedder
        self._vectors: dict[str, np.ndarray] = {}
        if path is not None and path.exists():
            try:  # an .npz is a zip: a file cut short or altered fails its CRC-32 here
                with reading(path):
                    with np.load(path, allow_pickle=False) as data:
                        self._vectors = dict(zip(data["keys"].tolist(), data["vectors"]))
            except DamagedArtefact as err:
                warn_rebuild(err, "its texts will be embedded again.")
                self._vectors = {}

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        from ..models.embedder import encode_texts, load_embedder, unit_rows

        missing = list(dict.fromkeys(t for t in texts if self._key(t) not in self._vectors))
        if missing and self._embedder is None:
            self._embedder = load_embedder(self.embedder_name)
        t0 = time.time()
        for lo in range(0, len(missing), self.chunk):  # saved chunk by chunk: an interrupted run resumes
            part = missing[lo : lo + self.chunk]
            vectors = unit_rows(encode_texts(self._embedder, part)).astype(np.float32)
            self._vectors.update(zip((self._key(t) for t in part), vectors))
            self._save()
        if missing:
            log.info("embedded %d texts with %s in %.0fs", len(missing), self.embedder_name, time.time() - t0)
        return np.stack([self._vectors[self._key(t)] for t in texts]) if texts else np.zeros((0, 0), np.float32)

    def _save(self) -> None:
        if self.path is None:
            return
        keys = np.array(list(self._vectors), dtype="U40")
        vectors = np.stack(list(self._vectors.values()))

        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=keys, vectors=vectors)


def _words(text: str) -> set[str]:
    return set(_TOKEN.findall(text.lower()))


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def _yesno(text: str) -> int:
    """+1 for an answer opening with "yes", -1 with "no", else 0."""
    first = text.lower().split(maxsplit=1)[:1]
    word = first[0].strip(",.!;:") if first else ""
    return 1 if word == "yes" else -1 if word == "no" else 0


def _negations(text: str) -> int:
    return len(_NEGATION.findall(text.lower()))


@dataclass
class _RefStats:
    """What the features need of one question's references, computed once per question."""

    correct: np.ndarray  # unit embeddings, one row per correct reference
    incorrect: np.ndarray
    best: np.ndarray
    correct_words: list[set]
    incorrect_words: list[set]
    yesno_correct: float  # mean yes/no polarity of the correct references
    yesno_incorrect: float
    neg_correct: float  # share of correct references with a negation
    neg_incorrect: float


class JudgeFeatures:
    """Feature rows (FEATURE_NAMES) of (question, answer) pairs: how the answer sits among the references."""

    def __init__(self, references: dict[str, References], store: EmbeddingStore):
        self.references = references
        self.store = store

    def _ref_stats(self, questions: Sequence[str]) -> dict[str, _RefStats]:
        refs = {
            q: self.references[q]
            for q in dict.fromkeys(questions)
            if q in self.references and self.references[q].correct and self.references[q].incorrect
        }
        texts = list(dict.fromkeys(t for r in refs.values() for t in [r.best, *r.correct, *r.incorrect]))
        vec = dict(zip(texts, self.store.encode(texts))) if texts else {}
        return {
            q: _RefStats(
                np.stack([vec[t] for t in r.correct]),
                np.stack([vec[t] for t in r.incorrect]),
                vec[r.best],
                [_words(t) for t in r.correct],
                [_words(t) for t in r.incorrect],
                float(np.mean([_yesno(t) for t in r.correct])),
                float(np.mean([_yesno(t) for t in r.incorrect])),
                float(np.mean([_negations(t) > 0 for t in r.correct])),
                float(np.mean([_negations(t) > 0 for t in r.incorrect])),
            )
            for q, r in refs.items()
        }

    def transform(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        stats = self._ref_stats(questions)
        e_ans = self.store.encode(list(answers))
        e_q = self.store.encode(list(questions))
        rows = [self._row(q, a, stats.get(q), ea, eq) for q, a, ea, eq in zip(questions, answers, e_ans, e_q)]
        return np.array(rows, dtype=np.float32).reshape(len(rows), len(FEATURE_NAMES))

    @staticmethod
    def _row(question: str, answer: str, ref: _RefStats | None, e_answer, e_question) -> list[float]:
        words, q_words = _words(answer), _words(question)
        yesno, negated = _yesno(answer), float(_negations(answer) > 0)
        if ref is not None:
            cos_c, cos_i = ref.correct @ e_answer, ref.incorrect @ e_answer
            jac_c = [_jaccard(words, w) for w in ref.correct_words]
            jac_i = [_jaccard(words, w) for w in ref.incorrect_words]
            against = [
                cos_c.max(),
                cos_c.sum() / len(cos_c),
                cos_i.max(),
                cos_i.sum() / len(cos_i),
                cos_c.max() - cos_i.max(),
                cos_c.sum() / len(cos_c) - cos_i.sum() / len(cos_i),
                ref.best @ e_answer,
                max(jac_c),
                sum(jac_c) / len(jac_c),
                max(jac_i),
                sum(jac_i) / len(jac_i),
                max(jac_c) - max(jac_i),
                yesno * ref.yesno_correct,
                yesno * ref.yesno_incorrect,
                negated * ref.neg_correct,
                negated * ref.neg_incorrect,
                ref.neg_correct - ref.neg_incorrect,
                0.0,
            ]
        else:  # a question outside TruthfulQA: the answer-only features must carry the verdict
            against = [0.0] * 17 + [1.0]
        alone = [
            e_question @ e_answer,
            len(words & q_words) / max(1, len(words)),
            np.log1p(len(words - q_words)),
            np.log1p(len(answer)),
            np.log1p(len(answer.split())),
            float(bool(REFUSAL_RE.search(answer))),
            float(not answer),
            float(yesno),
            float(_negations(answer)),
            float(answer.endswith("?")),
        ]
        return [float(x) for x in against + alone]

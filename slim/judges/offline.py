"""The offline judges: small MLPs on an answer's features against TruthfulQA's references, cross-fitted.

OfflineJudge is trained here on TruthfulQA's human-labelled judge data
(finetune_truth/info.jsonl) with sentence-embedding and reference features,
saved under $SLIM_CACHE/judges (safetensors, no pickle) and reloaded by later
runs; its identity is the sha256 of those saved weights. `load_judge_labels`
reads the labelled answers of the project's own model (data/judge-labels/).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import DamagedArtefact, artefact_lock, reading, warn_rebuild, write_checked
from .base import HASH_CHARS, Judge, _check_kind, default_cache_dir
from .features import FEATURE_NAMES, FEATURE_VERSION, EmbeddingStore, JudgeFeatures
from .labels import judge_labels_path, load_judge_data, load_judge_labels, load_references
from .mlp import TinyMLP

log = logging.getLogger(__package__)  # "slim.judges", as before the package split


_STORES: dict[Path, EmbeddingStore] = {}


def _sha256(path: Path) -> str:
    from ..data.truthfulqa import sha256_of

    return sha256_of(path)


def question_fold(question: str, n_folds: int) -> int:
    """The cross-fitting fold of a question: a hash of its stripped text, so it needs no stored assignment."""
    return int(hashlib.sha256(question.strip().encode("utf-8")).hexdigest(), 16) % n_folds if n_folds > 1 else 0


class OfflineJudge(Judge):
    """A judge trained here on labelled answers; no API, no GPU.

    Training data: TruthfulQA's human labels of GPT-3-era answers
    (finetune_truth/info.jsonl) and, by default, the labelled answers of the
    project's own model (`answer_labels`, data/judge-labels/: SmolLM2-135M,
    unintervened and under ITI, SLIM and MiMiC), each of those rows counting
    `answer_weight` times (they are 1.5k beside 22k human rows, and they are
    the distribution the judge scores).

    Features (FEATURE_NAMES): MiniLM cosines of the answer to the question's
    correct / incorrect / best reference answers (TruthfulQA.csv), word
    overlaps with them, yes/no and negation agreement, cosine and overlap with
    the question, length and refusal indicators; a small MLP maps them to
    P(yes), trained with the classes re-weighted to balance (the 0.5
    threshold targets balanced accuracy, not calibrated probabilities).

    Cross-fitted (`cross_fit` = K > 1, the default 5): the questions fall into
    K folds by a hash of their text (`question_fold`), K MLPs are trained each
    without one fold's questions (labels of both sources), and an answer is
    scored by the MLP that never saw a label for its question. So a verdict
    on a TruthfulQA answer, even one in the labelled set, is a held-out
    verdict, and the judge card (benchmarks/eval_judges.py) measures exactly
    the judge the runs use. K = 1 trains one MLP on everything.

    On first use the judge trains and saves itself (safetensors + JSON
    metadata, no pickle) under `cache_dir` keyed by the data checksums,
    feature version and settings; later runs reload it. Sentence embeddings
    are cached there too. `max_rows` trains on a random subset of whole
    questions holding about that many human rows (tests); `embedder`
    replaces MiniLM by any object with `encode(list[str])` (then name it with
    `embedder_name`).
    """

    def __init__(
        self,
        kind: str,
        tqa_dir=None,
        cache_dir=None,
        embedder=None,
        embedder_name: str = "all-MiniLM-L6-v2",
        max_rows: int | None = None,
        seed: int = 0,
        hidden: int = 64,
        epochs: int = 30,
        answer_labels=True,
        answer_weight: float = 5.0,
        cross_fit: int = 5,
    ):
        self.kind = _check_kind(kind)
        self.tqa_dir = tqa_dir
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.embedder_name = embedder_name
        self.max_rows, self.seed = max_rows, seed
        if isinstance(cross_fit, bool) or not isinstance(cross_fit, int) or cross_fit < 1:
            raise ValueError(f"cross_fit must be a whole number of folds >= 1 (1: one MLP), got {cross_fit!r}.")
        if not (np.isfinite(answer_weight) and answer_weight > 0):
            raise ValueError(f"answer_weight must be a positive number, got {answer_weight!r}.")
        self.cross_fit, self.answer_weight = cross_fit, float(answer_weight)
        # True: the project's labels (data/judge-labels); a path: that file; False / None: human labels only
        self.answer_labels = judge_labels_path() if answer_labels is True else answer_labels or None
        self.name = "offline" if self.answer_labels else "offline-human"
        self.mlps = [TinyMLP(hidden=hidden, epochs=epochs, seed=seed + k) for k in range(cross_fit)]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", embedder_name)
        store_path = self.cache_dir / f"embeddings-{slug}.npz"
        if embedder is None:  # the truth and info judges of a run share one store (and one model)
            if store_path not in _STORES:
                _STORES[store_path] = EmbeddingStore(embedder_name, store_path)
            self.store = _STORES[store_path]
        else:
            self.store = EmbeddingStore(embedder_name, store_path, embedder)
        self._features: JudgeFeatures | None = None

    @property
    def mlp(self) -> TinyMLP:
        """The first (or only) MLP: its settings are every fold's."""
        return self.mlps[0]

    @property
    def features(self) -> JudgeFeatures:
        if self._features is None:
            self._features = JudgeFeatures(load_references(self.tqa_dir), self.store)
        return self._features

    @property
    def fitted(self) -> bool:
        return all(m.net is not None for m in self.mlps)

    @property
    def identity(self) -> str:
        """`offline@sha256:<16 hex>` (`offline-human@...` without the model's labelled answers) of the judge's
        weights (loaded, or trained and saved, on first use): every fold's names, dtypes, shapes and bytes,
        and the kind, feature version, embedder, training sources and cross-fitting they were trained with.

        Not the saved file's own sha256: safetensors writes the metadata in a random order, so two saves of
        the same weights differ as files, and a judge retrained to the same weights would look like another.
        """
        import torch

        self.ensure_ready()
        digest = hashlib.sha256(json.dumps({k: v for k, v in self._metadata().items() if k != "features"}).encode())
        for name, tensor in sorted(self._tensors().items()):
            digest.update(f"\0{name}|{tuple(tensor.shape)}|{tensor.dtype}\0".encode())
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return f"{self.name}@sha256:{digest.hexdigest()[:HASH_CHARS]}"

    def folds_of(self, questions: Sequence[str]) -> np.ndarray:
        """(n,) the fold of each question, i.e. the MLP that scores its answers."""
        return np.array([question_fold(q, self.cross_fit) for q in questions], dtype=int)

    def fit(self, questions: Sequence[str], answers: Sequence[str], labels, sample_weight=None) -> "OfflineJudge":
        """Train the K MLPs: MLP k on the rows whose question is not in fold k (all rows when K = 1)."""
        questions, answers = self._pairs(questions, answers)
        labels = np.asarray(labels, dtype=bool)
        weight = np.ones(len(labels)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        t0 = time.time()
        X = self.features.transform(questions, answers)
        t1 = time.time()
        folds = self.folds_of(questions)
        for k, mlp in enumerate(self.mlps):
            train = folds != k if self.cross_fit > 1 else np.ones(len(labels), bool)
            mlp.fit(X[train], labels[train], weight[train])
        log.info(
            "offline %s judge: features of %d rows in %.0fs, %d MLP(s) in %.0fs",
            self.kind,
            len(questions),
            t1 - t0,
            self.cross_fit,
            time.time() - t1,
        )
        return self

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        questions, answers = self._pairs(questions, answers)
        self.ensure_ready()
        if not questions:
            return np.zeros(0)
        X = self.features.transform(questions, answers)
        folds = self.folds_of(questions)
        scores = np.zeros(len(questions))
        for k in np.unique(folds):  # each answer by the MLP trained without its question
            scores[folds == k] = self.mlps[k].predict_proba(X[folds == k])
        return scores

    # training data and persistence -----------------------------------------------------------
    def training_data(self) -> tuple[list[str], list[str], np.ndarray, Path]:
        """TruthfulQA's human-labelled rows this judge trains on (a question-wise subsample when max_rows is set)."""
        questions, answers, labels, path = load_judge_data(self.kind, self.tqa_dir)
        if self.max_rows and self.max_rows < len(questions):
            order = list(dict.fromkeys(questions))
            random.Random(self.seed).shuffle(order)
            counts: dict[str, int] = {}
            for q in questions:
                counts[q] = counts.get(q, 0) + 1
            chosen, total = set(), 0
            for q in order:
                if total >= self.max_rows:
                    break
                chosen.add(q)
                total += counts[q]
            keep = [i for i, q in enumerate(questions) if q in chosen]
            questions = [questions[i] for i in keep]
            answers = [answers[i] for i in keep]
            labels = labels[keep]
        return questions, answers, labels, path

    def answer_label_data(self) -> tuple[list[str], list[str], np.ndarray]:
        """The model's labelled answers this judge trains on (empty without `answer_labels`)."""
        if not self.answer_labels:
            return [], [], np.zeros(0, bool)
        df = load_judge_labels(self.answer_labels)
        column = "truthful" if self.kind == "truth" else "informative"
        return df["question"].tolist(), [a.strip() for a in df["answer"]], df[column].to_numpy() == 1

    def all_training_data(self) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        """(questions, answers, labels, weights) of both sources: human rows weigh 1, the model's answer_weight."""
        hq, ha, hy, _ = self.training_data()
        aq, aa, ay = self.answer_label_data()
        weights = np.concatenate([np.ones(len(hq)), np.full(len(aq), self.answer_weight)])
        return list(hq) + aq, list(ha) + aa, np.concatenate([hy, ay]), weights

    def model_path(self) -> Path:
        """Where the trained judge lives: keyed by data checksums, feature version and settings."""
        from ..data.truthfulqa import find_truthfulqa_file

        data = find_truthfulqa_file(f"finetune_{self.kind}.jsonl", self.tqa_dir)
        csv = find_truthfulqa_file("TruthfulQA.csv", self.tqa_dir)
        settings = [
            _sha256(data),
            _sha256(csv),
            FEATURE_VERSION,
            self.embedder_name,
            self.max_rows,
            self.mlp.get_params(),
        ]
        if self.answer_labels or self.cross_fit > 1:  # keeps the key of a judge trained as before (human, K = 1)
            labels_sha = _sha256(Path(self.answer_labels)) if self.answer_labels else None
            settings += [labels_sha, self.answer_weight if self.answer_labels else None, self.cross_fit]
        key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.name}-{self.kind}-{key}.safetensors"

    def ensure_ready(self) -> "OfflineJudge":
        """Load the saved judge, or train it on the labelled data and save it."""
        if self.fitted:
            return self
        path = self.model_path()
        with artefact_lock(path):  # concurrent runs (ENGINE=ray) train it once: the others wait, then load it
            if path.exists():
                try:
                    return self.load(path)
                except DamagedArtefact as err:
                    warn_rebuild(err, f"training the offline {self.kind} judge again.")
            # A one-off of a few minutes on a CPU (mostly embedding ~22k texts), so say so as slim.models does.
            log.info("training the offline %s judge once into %s ...", self.kind, path)
            self.fit(*self.all_training_data())
            self.save(path)
        return self

    def _tensors(self) -> dict:
        if self.cross_fit == 1:  # the layout of a single judge, as before cross-fitting
            return self.mlp.tensors()
        return {f"fold{k}.{name}": t for k, mlp in enumerate(self.mlps) for name, t in mlp.tensors().items()}

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        if not self.fitted:
            raise RuntimeError("this OfflineJudge is not trained: call fit() or score() first.")
        return write_checked(Path(path), lambda tmp: save_file(self._tensors(), tmp, metadata=self._metadata()))

    def _metadata(self) -> dict:
        meta = {
            "kind": self.kind,
            "feature_version": FEATURE_VERSION,
            "embedder": self.embedder_name,
            "features": json.dumps(FEATURE_NAMES),
        }
        if self.answer_labels or self.cross_fit > 1:
            meta["answer_labels"] = _sha256(Path(self.answer_labels)) if self.answer_labels else "none"
            meta["answer_weight"] = str(self.answer_weight if self.answer_labels else 0)
            meta["cross_fit"] = str(self.cross_fit)
        return meta

    def load(self, path) -> "OfflineJudge":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        with reading(path, "delete it to train the judge again."):
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            expected = {k: v for k, v in self._metadata().items() if k != "features"}
            found = {k: meta.get(k) for k in expected}
            if found != expected:
                raise DamagedArtefact(path, f"holds a judge for {found}, not {expected}", "delete it to retrain.")
            tensors = load_file(str(path))
            if self.cross_fit == 1:
                self.mlp.load_tensors(tensors)
            else:
                for k, mlp in enumerate(self.mlps):
                    prefix = f"fold{k}."
                    mlp.load_tensors({n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)})
        return self

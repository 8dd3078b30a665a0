"""How well do the offline judges agree with TruthfulQA's human labels on unseen questions?

For each kind (truth, info): GroupKFold by question over finetune_{kind}.jsonl;
the judge's MLP is trained on the other folds' questions and scores the
held-out ones (features use only the held-out question's reference answers
from TruthfulQA.csv, which every evaluated question has). Beside it, a
simple rule as baseline:
    truth: the SEM rule, true when Q(q, a) >= 0 (paper section 5.1, MiniLM);
           an answer to a question without references counts as true;
    info:  informative unless the answer is empty or a refusal
           ("no comment", "I don't know", ...: the judge's refusal pattern).
First the full judges are trained (or loaded) and timed, as a run would.

    python benchmarks/eval_judges.py --tqa_dir ../shared/data/truthfulqa
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import GroupKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slim.judges import REFUSAL_RE, OfflineJudge, TinyMLP, load_judge_data, load_references  # noqa: E402
from slim.metrics import sem_scores  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tqa_dir",
        default=None,
        help="folder with TruthfulQA.csv and finetune_*.jsonl (default: SLIM_TQA_DIR, else the cache)",
    )
    p.add_argument("--cache_dir", default=None, help="judge cache (default: $SLIM_CACHE/judges)")
    p.add_argument("--kinds", nargs="+", default=["truth", "info"], choices=["truth", "info"])
    p.add_argument("--n_splits", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_full", action="store_true", help="do not train/load the full judges first")
    return p.parse_args(argv)


def baseline(kind: str, judge: OfflineJudge, questions, answers) -> np.ndarray:
    """The simple rule's verdicts (see the module docstring)."""
    if kind == "info":
        return np.array([bool(a) and not REFUSAL_RE.search(a) for a in answers])
    refs = load_references(judge.tqa_dir)
    verdict = np.ones(len(answers), dtype=bool)
    known = [i for i, q in enumerate(questions) if q in refs]
    q_scores, _ = sem_scores(
        judge.store,
        [answers[i] for i in known],
        [refs[questions[i]].correct for i in known],
        [refs[questions[i]].incorrect for i in known],
    )
    verdict[known] = q_scores >= 0
    return verdict


def cross_validate(judge: OfflineJudge, questions, answers, labels, n_splits: int) -> tuple[np.ndarray, list]:
    """Held-out P(yes) of every row, and the balanced accuracy of each fold."""
    X = judge.features.transform(questions, answers)
    groups = np.unique(questions, return_inverse=True)[1]
    scores = np.zeros(len(labels))
    per_fold = []
    for train, test in GroupKFold(n_splits).split(X, labels, groups):
        mlp = TinyMLP(**judge.mlp.get_params()).fit(X[train], labels[train])
        scores[test] = mlp.predict_proba(X[test])
        per_fold.append(balanced_accuracy_score(labels[test], scores[test] > 0.5))
    return scores, per_fold


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    lines = []
    for kind in args.kinds:
        judge = OfflineJudge(kind, tqa_dir=args.tqa_dir, cache_dir=args.cache_dir, seed=args.seed)
        if not args.skip_full:
            cached = judge.model_path().exists()
            t0 = time.time()
            judge.ensure_ready()
            lines.append(
                f"{kind}: full judge {'loaded' if cached else 'trained'} in {time.time() - t0:.0f}s "
                f"({judge.model_path()})"
            )
        questions, answers, labels, _ = load_judge_data(kind, args.tqa_dir)
        t0 = time.time()
        scores, per_fold = cross_validate(judge, questions, answers, labels, args.n_splits)
        cv_time = time.time() - t0
        rule = baseline(kind, judge, questions, answers)
        n_q = len(set(questions))
        lines.append(
            f"{kind}: {len(labels)} rows, {n_q} questions, {labels.mean():.1%} 'yes'; "
            f"{args.n_splits}-fold GroupKFold by question ({cv_time:.0f}s)"
        )
        for name, verdict in (
            ("offline judge", scores > 0.5),
            ("SEM rule Q>=0" if kind == "truth" else "not empty/refusal rule", rule),
        ):
            lines.append(
                f"  {name:<24} accuracy {accuracy_score(labels, verdict):.3f}  "
                f"balanced accuracy {balanced_accuracy_score(labels, verdict):.3f}"
            )
        lines.append(f"  offline judge balanced accuracy per fold: {' '.join(f'{b:.3f}' for b in per_fold)}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

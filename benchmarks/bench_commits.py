"""Answering speed of two commits side by side: is the new code slower on this machine?

    python benchmarks/bench_commits.py --old eda2bb7 --new HEAD --n-questions 64 --rounds 2

Each commit is checked out once into a temporary worktree; then, round after round
and in alternating order (so a slow spell of the machine hits both alike), a fresh
process of each answers the same TruthfulQA questions with `answer_questions`
(the shared-prompt cache, stopping at the answer, batch 64), unedited and under a
random SLIM policy (benchmarks/bench_answering.py's), and reports its seconds and a
hash of its answers. Prints each commit's median time per pass, the new/old ratio
and whether the answers are identical. Model loading is not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs inside a worktree (its own slim package first on sys.path); uses names both commits have.
CHILD = r"""
import hashlib, json, sys, tempfile, time
sys.path.insert(0, "benchmarks")
import torch
from bench_answering import random_slim
from slim.answering.answers import answer_questions
from slim.data.truthfulqa import load_truthfulqa
from slim.models.loading import load_model

n, tqa = int(sys.argv[1]), sys.argv[2] or None
torch.manual_seed(0)
lm = load_model("smollm2_135M", device="cpu")
questions = load_truthfulqa(tqa).head(n).reset_index(drop=True)
questions["question_idx"] = range(len(questions))
out = {}
for name, edit in (("none", None), ("slim", random_slim(lm.model))):
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        answers = answer_questions(lm.model, lm.tokenizer, questions, f"{tmp}/a.csv", edit=edit, progress=False)
        seconds = time.perf_counter() - t0
    digest = hashlib.sha256("\n".join(answers["generation"]).encode()).hexdigest()[:16]
    out[name] = {"seconds": seconds, "answers": digest}
print(json.dumps(out))
"""


def worktree(rev: str, root: Path) -> Path:
    """A detached checkout of `rev` under `root`."""
    path = root / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the commit to compare against (e.g. the one before a change)")
    parser.add_argument("--new", default="HEAD")
    parser.add_argument("--n-questions", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tqa_dir", default="")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="slim-bench-") as tmp:
        trees = {side: worktree(getattr(args, side), Path(tmp)) for side in ("old", "new")}
        try:
            for r in range(args.rounds):
                for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    proc = subprocess.run(
                        [sys.executable, "-c", CHILD, str(args.n_questions), args.tqa_dir],
                        cwd=trees[side], capture_output=True, text=True, check=True,
                    )  # fmt: skip
                    results[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    print(f"round {r + 1}, {side}: {results[side][-1]}", flush=True)
        finally:
            for path in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)
    print(f"\n{args.n_questions} questions, old {args.old}, new {args.new}, {args.rounds} rounds, median seconds:")
    for edit in ("none", "slim"):
        old = statistics.median(r[edit]["seconds"] for r in results["old"])
        new = statistics.median(r[edit]["seconds"] for r in results["new"])
        same = {r[edit]["answers"] for r in results["old"] + results["new"]}
        print(
            f"  {edit:>4}: old {old:6.1f} s, new {new:6.1f} s, new/old {new / old:.3f}; "
            f"answers {'identical' if len(same) == 1 else 'DIFFER'}"
        )


if __name__ == "__main__":
    main()

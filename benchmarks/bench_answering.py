"""Answering speed: the full prompt for 50 steps (old path) vs the shared-prompt cache and stopping at the answer.

    python benchmarks/bench_answering.py --n-questions 64

The same TruthfulQA questions are answered by both paths in one run, batch
by batch and back to back (the order swapping from pair to pair, so a slow
spell of the machine hits both sides alike), without a policy and with a
SLIM policy attached (--policy <saved folder>, else random probes and maps at
layer 19 with tau and kappa set so it edits often). Prints questions per
second of each path, their ratio, and how many extracted answers are
identical. The new path's time includes building the prefix cache once per
pass, as `answer_questions` does once per answer file. --ablate also times
each speed-up alone; --new-batch-size gives the new path its own batch (the
pipeline answers 64 at a time).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from slim.answering.decoding import generate_greedy  # noqa: E402
from slim.answering.prefix import PrefixCache  # noqa: E402
from slim.answering.prompts import extract_answer, qa_prompt, shared_prefix
from slim.data.truthfulqa import load_truthfulqa  # noqa: E402
from slim.models.heads import model_shape  # noqa: E402
from slim.models.loading import load_model  # noqa: E402
from slim.policies.base import Policy, model_fingerprint
from slim.policies.slim import SlimPolicy  # noqa: E402

# name: (shared-prompt cache, stop at the answer)
PATHS = {"old": (False, False), "cache only": (True, False), "stop only": (False, True), "new": (True, True)}


def random_slim(model) -> SlimPolicy:
    """Random probes and maps at layer 19: tau 2 of 9 heads and kappa 5, so the edit runs and moves often."""
    L, H, d = model_shape(model)
    g = torch.Generator().manual_seed(0)
    return SlimPolicy(
        torch.randn(H, d, generator=g) * 0.05,
        torch.zeros(H),
        torch.eye(d) + 0.02 * torch.randn(H, d, d, generator=g),
        0.02 * torch.randn(H, d, generator=g),
        layer=min(19, L - 1),
        tau=2,
        kappa=5.0,
        fingerprint=model_fingerprint(model),
    )


def build_prefix(lm, path, example):
    """(seconds, the shared-prompt cache or None) for `path`."""
    t0 = time.perf_counter()
    prefix = PrefixCache.build(lm.model, lm.tokenizer, shared_prefix(), example=example) if PATHS[path][0] else None
    return time.perf_counter() - t0, prefix


def answer_batch(lm, chunk, path, prefix, edit, max_new_tokens, batch_size):
    """(seconds, extracted answers) of a chunk of prompts, answered `batch_size` at a time."""
    t0 = time.perf_counter()
    texts = []
    for lo in range(0, len(chunk), batch_size):
        texts += generate_greedy(
            lm.model,
            lm.tokenizer,
            chunk[lo : lo + batch_size],
            max_new_tokens,
            edit,
            prefix=prefix,
            stop_at_answer=PATHS[path][1],
        )
    return time.perf_counter() - t0, [extract_answer(t) for t in texts]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135M")
    parser.add_argument("--policy", default=None, help="a saved SLIM (or ITI) policy folder")
    parser.add_argument("--n-questions", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--new-batch-size", type=int, default=None, help="batch of the new path (default: --batch-size)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ablate", action="store_true", help="also time each speed-up alone")
    parser.add_argument("--tqa_dir", default=None)
    args = parser.parse_args()

    lm = load_model(args.model, device="cpu")
    policy = Policy.load(args.policy) if args.policy else random_slim(lm.model)
    questions = load_truthfulqa(args.tqa_dir)["Question"].tolist()[: args.n_questions]
    # Longest first, as answer_questions batches them.
    prompts = sorted((qa_prompt(q) for q in questions), key=len, reverse=True)
    # Timed in chunks that hold whole batches of either path, each chunk by each path back to back.
    sizes = {p: args.batch_size for p in PATHS} | {"new": args.new_batch_size or args.batch_size}
    chunk = max(sizes.values())
    batches = [prompts[i : i + chunk] for i in range(0, len(prompts), chunk)]
    paths = list(PATHS) if args.ablate else ["old", "new"]
    described = args.policy or f"random SLIM at layer {policy.layer} (tau {policy.tau}, kappa {policy.kappa:g})"
    print(
        f"model {args.model}, {len(prompts)} TruthfulQA questions, batch {args.batch_size} (new path: {sizes['new']}), "
        f"up to {args.max_new_tokens} new tokens, {torch.get_num_threads()} torch threads, {args.repeats} repeats; "
        f"policy: {described}"
    )
    for label, edit in (("no policy", None), ("with SLIM", policy)):
        prefixes = {p: build_prefix(lm, p, prompts[0])[1] for p in paths}
        # Warm-up pass of each path (greedy: every later pass gives the same answers).
        answers = {
            p: [a for b in batches for a in answer_batch(lm, b, p, prefixes[p], edit, args.max_new_tokens, sizes[p])[1]]
            for p in paths
        }
        seconds = {p: 0.0 for p in paths}  # summed over repeats: batches plus one prefix build a pass
        ratios = []  # old / new, batch by batch
        for r in range(args.repeats):
            for p in paths:
                t, prefixes[p] = build_prefix(lm, p, prompts[0])
                seconds[p] += t
            for j, batch in enumerate(batches):
                # The paths back to back on the same batch, the order swapping from pair to pair.
                order = paths if (r + j) % 2 == 0 else paths[::-1]
                took = {
                    p: answer_batch(lm, batch, p, prefixes[p], edit, args.max_new_tokens, sizes[p])[0] for p in order
                }
                for p in paths:
                    seconds[p] += took[p]
                ratios.append(took["old"] / took["new"])
        print(f"{label}:")
        for p in paths:
            t = seconds[p] / args.repeats
            same = sum(a == b for a, b in zip(answers[p], answers["old"]))
            print(
                f"  {p:<11} {len(prompts) / t:6.2f} questions/s  ({t:6.1f} s a pass)  "
                f"speed-up {seconds['old'] / seconds[p]:4.2f}x  "
                f"answers identical to the old path: {same}/{len(prompts)}"
            )
        q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        print(
            f"  new vs old, chunk by chunk: median {med:.2f}x (quartiles {q1:.2f}x to {q3:.2f}x, {len(ratios)} pairs)"
        )
        for p in paths:
            for i, (a, b) in enumerate(zip(answers[p], answers["old"])):
                if a != b:
                    print(f"  differs ({p}), prompt {i}: old {b!r} / {p} {a!r}")


if __name__ == "__main__":
    main()

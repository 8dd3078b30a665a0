"""Inference overhead of a SLIM policy: the same questions answered with and without it, one run.

    python benchmarks/bench_overhead.py --policy validation/policies/smollm2_135M/<slim folder> --n-questions 32

Without --policy, a SLIM policy with random probes and maps is attached at
layer 19 (what is timed is the per-step edit, whatever its values). Runs
decode each batch plain and edited back to back (the order swapping from pair
to pair) and report the median ratio over all pairs, and the time spent inside
the edit itself.

An edit that changes what the model says also changes how long it talks (a
batch stops once every answer has ended), which mixes the edit's cost with
its effect. Two ways to take that out:
  --kappa 0        the edit runs in full but moves nothing: the same tokens;
  --fixed-length   every batch decodes exactly --max-new-tokens steps (end of
                   sequence ignored), so both runs do the same amount of work
                   whatever the edit makes the model say.
Time per decoded token (batch rows x decode steps) is printed in every mode.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from slim.data import load_truthfulqa  # noqa: E402
from slim.generation import greedy_tokens, qa_prompt  # noqa: E402
from slim.heads import model_shape  # noqa: E402
from slim.interventions import Policy, SlimPolicy, model_fingerprint  # noqa: E402
from slim.models import load_model  # noqa: E402


def decode_batch(lm, prompts, max_new_tokens, fixed_length, edit):
    """Greedy continuations and the number of decode steps the batch ran."""
    new = greedy_tokens(
        lm.model, lm.tokenizer, prompts, max_new_tokens, edit, min_new_tokens=max_new_tokens if fixed_length else None
    )  # (batch, steps)
    return lm.tokenizer.batch_decode(new, skip_special_tokens=True), new.shape[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135M")
    parser.add_argument("--policy", default=None, help="a saved SLIM policy folder")
    parser.add_argument("--n-questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--kappa",
        type=float,
        default=None,
        help="override the policy's kappa; 0 keeps every computation of the edit but leaves the "
        "tokens unchanged, so both runs decode the same tokens",
    )
    parser.add_argument(
        "--fixed-length",
        action="store_true",
        help="decode exactly --max-new-tokens steps in every batch (end of sequence ignored), so "
        "plain and edited runs do the same work even where the edit changes the answers",
    )
    parser.add_argument("--tqa_dir", default=None)
    args = parser.parse_args()

    lm = load_model(args.model, device="cpu")
    if args.policy:
        policy = Policy.load(args.policy)
    else:
        L, H, d = model_shape(lm.model)
        g = torch.Generator().manual_seed(0)
        policy = SlimPolicy(
            torch.randn(H, d, generator=g) * 0.05,
            torch.zeros(H),
            torch.eye(d) + 0.01 * torch.randn(H, d, d, generator=g),
            torch.zeros(H, d),
            layer=min(19, L - 1),
            tau=0,
            kappa=0.0,
            fingerprint=model_fingerprint(lm.model),
        )
    if args.kappa is not None:
        policy.kappa = args.kappa
    questions = load_truthfulqa(args.tqa_dir)["Question"].tolist()[: args.n_questions]
    prompts = [qa_prompt(q) for q in questions]
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]

    # Time spent inside the edit itself (probes, detector, maps), summed over every forward call.
    inside = {"s": 0.0, "calls": 0}
    edit_body = policy.edit

    def timed_edit(layer, acts):
        t0 = time.perf_counter()
        out = edit_body(layer, acts)
        inside["s"] += time.perf_counter() - t0
        inside["calls"] += 1
        return out

    policy.edit = timed_edit  # attach() hands this bound attribute to the hook

    def run(batch, edit):
        t0 = time.perf_counter()
        texts, steps = decode_batch(lm, batch, args.max_new_tokens, args.fixed_length, edit)
        return time.perf_counter() - t0, texts, len(batch) * steps

    # Warm-up pass of each; greedy decoding makes every later pass decode the same tokens.
    plain_first = [run(b, None) for b in batches]
    edited_first = [run(b, policy) for b in batches]
    same = sum(a == b for p, e in zip(plain_first, edited_first) for a, b in zip(p[1], e[1]))
    plain_tokens = [p[2] for p in plain_first]
    edited_tokens = [e[2] for e in edited_first]

    # Paired design: each batch is decoded plain and edited back to back, the order swapping from
    # pair to pair, so a slow spell of the machine hits both sides of a pair alike.
    inside.update(s=0.0, calls=0)
    plain, edited = [[] for _ in batches], [[] for _ in batches]
    for r in range(args.repeats):
        for j, batch in enumerate(batches):
            for edit in (None, policy) if (r + j) % 2 == 0 else (policy, None):
                (plain if edit is None else edited)[j].append(run(batch, edit)[0])
    ratios = [
        (e / edited_tokens[j]) / (p / plain_tokens[j]) for j in range(len(batches)) for p, e in zip(plain[j], edited[j])
    ]
    q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    t_plain = sum(map(sum, plain)) / args.repeats  # one pass over all questions
    t_edit = sum(map(sum, edited)) / args.repeats
    ms_plain, ms_edit = 1e3 * t_plain / sum(plain_tokens), 1e3 * t_edit / sum(edited_tokens)
    t_inside = inside["s"] / args.repeats
    print(
        f"model {args.model}, {len(prompts)} questions, batch {args.batch_size}, {args.max_new_tokens} new tokens"
        f"{' (fixed length)' if args.fixed_length else ' (batch stops when every answer has ended)'}, "
        f"policy {'random SLIM (layer %d)' % policy.layer if not args.policy else args.policy}, "
        f"kappa {policy.kappa:g}, {torch.get_num_threads()} torch threads, {args.repeats} repeats"
    )
    print(
        f"unintervened : {t_plain:7.2f} s a pass  ({t_plain / len(prompts):.3f} s a question, "
        f"{sum(plain_tokens)} decoded tokens, {ms_plain:.2f} ms a token)"
    )
    print(
        f"with SLIM    : {t_edit:7.2f} s a pass  ({t_edit / len(prompts):.3f} s a question, "
        f"{sum(edited_tokens)} decoded tokens, {ms_edit:.2f} ms a token)"
    )
    print(
        f"overhead     : {100 * (med - 1):+.1f} % a decoded token, median of {len(ratios)} paired batches "
        f"(quartiles {100 * (q1 - 1):+.1f} % to {100 * (q3 - 1):+.1f} %); means {100 * (t_edit / t_plain - 1):+.1f} %"
    )
    print(
        f"inside edit  : {1e3 * t_inside:.1f} ms a pass = {100 * t_inside / t_edit:.2f} % of the edited time "
        f"({inside['calls'] // args.repeats} forward calls, {1e6 * inside['s'] / max(inside['calls'], 1):.0f} us each)"
    )
    print(f"tokens       : {same}/{len(prompts)} generations identical to the unintervened ones")


if __name__ == "__main__":
    main()

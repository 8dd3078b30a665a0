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
The paired timing itself is slim.paper.timing.paired_overhead, which timings.py
(the paper's Table 4) uses too; this script decodes with model.generate on
the full prompts, timings.py as the pipeline answers.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from slim.answering.prompts import qa_prompt  # noqa: E402
from slim.data.truthfulqa import load_truthfulqa  # noqa: E402
from slim.models.heads import model_shape  # noqa: E402
from slim.models.loading import load_model  # noqa: E402
from slim.paper.overhead import paired_overhead  # noqa: E402
from slim.policies.base import Policy, model_fingerprint
from slim.policies.slim import SlimPolicy  # noqa: E402


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

    # One warm-up pass each way, then each batch plain and edited back to back, the order swapping from pair
    # to pair, so a slow spell of the machine hits both sides of a pair alike (slim.paper.timing.paired_overhead).
    result = paired_overhead(
        lm,
        prompts,
        policy,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        fixed_length=args.fixed_length,
        time_edit=True,
    )
    per_token = result.per_token
    q1, med, q3 = per_token.quartiles()
    tot = result.totals()
    t_plain, t_edit = tot["plain_s"], tot["edited_s"]
    ms_plain, ms_edit = 1e3 * t_plain / tot["plain_tokens"], 1e3 * t_edit / tot["edited_tokens"]
    print(
        f"model {args.model}, {len(prompts)} questions, batch {args.batch_size}, {args.max_new_tokens} new tokens"
        f"{' (fixed length)' if args.fixed_length else ' (batch stops when every answer has ended)'}, "
        f"policy {'random SLIM (layer %d)' % policy.layer if not args.policy else args.policy}, "
        f"kappa {policy.kappa:g}, {torch.get_num_threads()} torch threads, {args.repeats} repeats"
    )
    print(
        f"unintervened : {t_plain:7.2f} s a pass  ({t_plain / len(prompts):.3f} s a question, "
        f"{tot['plain_tokens']:.0f} decoded tokens, {ms_plain:.2f} ms a token)"
    )
    print(
        f"with SLIM    : {t_edit:7.2f} s a pass  ({t_edit / len(prompts):.3f} s a question, "
        f"{tot['edited_tokens']:.0f} decoded tokens, {ms_edit:.2f} ms a token)"
    )
    print(
        f"overhead     : {med:+.1f} % a decoded token, median of {per_token.n} paired batches "
        f"(quartiles {q1:+.1f} % to {q3:+.1f} %); means {tot['mean_increase_pct']:+.1f} %"
    )
    calls = max(tot["inside_calls"], 1)
    print(
        f"inside edit  : {1e3 * tot['inside_s']:.1f} ms a pass = {100 * tot['inside_s'] / t_edit:.2f} % of the edited "
        f"time ({tot['inside_calls']:.0f} forward calls, {1e6 * tot['inside_s'] / calls:.0f} us each)"
    )
    print(f"tokens       : {result.same}/{len(prompts)} generations identical to the unintervened ones")


if __name__ == "__main__":
    main()

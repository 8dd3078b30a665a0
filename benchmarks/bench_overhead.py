"""Inference overhead of a SLIM policy: the same questions answered with and without it, one run.

    python benchmarks/bench_overhead.py --policy validation/policies/smollm2_135M/<slim folder> --n-questions 32

Without --policy, a SLIM policy with random probes and maps is attached at
layer 19 (what is timed is the per-step edit, whatever its values). Runs
alternate plain / edited batches and report the median of --repeats runs.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from slim.data import load_truthfulqa  # noqa: E402
from slim.generation import generate_greedy, qa_prompt  # noqa: E402
from slim.interventions import Policy, SlimPolicy, model_fingerprint  # noqa: E402
from slim.models import load_model, model_shape  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135M")
    parser.add_argument("--policy", default=None, help="a saved SLIM policy folder")
    parser.add_argument("--n-questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kappa", type=float, default=None,
                        help="override the policy's kappa; 0 keeps every computation of the edit but leaves the "
                             "tokens unchanged, so both runs decode the same tokens")
    parser.add_argument("--tqa_dir", default=None)
    args = parser.parse_args()

    lm = load_model(args.model, device="cpu")
    if args.policy:
        policy = Policy.load(args.policy)
    else:
        L, H, d = model_shape(lm.model)
        g = torch.Generator().manual_seed(0)
        policy = SlimPolicy(torch.randn(H, d, generator=g) * 0.05, torch.zeros(H),
                            torch.eye(d) + 0.01 * torch.randn(H, d, d, generator=g), torch.zeros(H, d),
                            layer=min(19, L - 1), tau=0, kappa=0.0, fingerprint=model_fingerprint(lm.model))
    if args.kappa is not None:
        policy.kappa = args.kappa
    questions = load_truthfulqa(args.tqa_dir)["Question"].tolist()[:args.n_questions]
    prompts = [qa_prompt(q) for q in questions]

    def answer_all(edit):
        t0 = time.perf_counter()
        out = []
        for i in range(0, len(prompts), args.batch_size):
            out += generate_greedy(lm.model, lm.tokenizer, prompts[i:i + args.batch_size], args.max_new_tokens,
                                   edit=edit)
        return time.perf_counter() - t0, out

    _, plain_out = answer_all(None)  # warm-up
    _, edited_out = answer_all(policy)
    same = sum(a == b for a, b in zip(plain_out, edited_out))
    plain, edited = [], []
    for _ in range(args.repeats):
        plain.append(answer_all(None)[0])
        edited.append(answer_all(policy)[0])
    t_plain, t_edit = statistics.median(plain), statistics.median(edited)
    print(f"model {args.model}, {len(prompts)} questions, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
          f"policy {'random SLIM (layer %d)' % policy.layer if not args.policy else args.policy}, "
          f"{torch.get_num_threads()} torch threads, median of {args.repeats}")
    print(f"unintervened : {t_plain:7.2f} s  ({t_plain / len(prompts):.3f} s a question)")
    print(f"with SLIM    : {t_edit:7.2f} s  ({t_edit / len(prompts):.3f} s a question)")
    print(f"overhead     : {100 * (t_edit / t_plain - 1):+.1f} %  (kappa {policy.kappa:g}; "
          f"{same}/{len(prompts)} generations identical to the unintervened ones)")


if __name__ == "__main__":
    main()

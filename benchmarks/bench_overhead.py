"""Inference overhead of a SLIM policy: the same questions answered with and without it, one run.

    python benchmarks/bench_overhead.py --policy validation/policies/smollm2_135M/<slim folder> --n-questions 32

Without --policy, a SLIM policy with random probes and maps is attached at
layer 19 (what is timed is the per-step edit, whatever its values). Runs
alternate plain / edited batches and report the median of --repeats runs.

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
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from slim.data import load_truthfulqa  # noqa: E402
from slim.generation import qa_prompt  # noqa: E402
from slim.interventions import Policy, SlimPolicy, model_fingerprint  # noqa: E402
from slim.models import load_model, model_shape  # noqa: E402


@torch.no_grad()
def decode_batch(lm, prompts, max_new_tokens, fixed_length, edit):
    """Greedy continuations and the number of decode steps the batch ran."""
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    with edit(lm.model) if edit is not None else contextlib.nullcontext():
        out = lm.model.generate(**enc, max_new_tokens=max_new_tokens,
                                min_new_tokens=max_new_tokens if fixed_length else 0,
                                do_sample=False, num_beams=1, pad_token_id=lm.tokenizer.pad_token_id,
                                temperature=None, top_p=None, top_k=None)
    new = out[:, enc["input_ids"].shape[1]:]  # (batch, steps)
    return lm.tokenizer.batch_decode(new, skip_special_tokens=True), new.shape[1]


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
    parser.add_argument("--fixed-length", action="store_true",
                        help="decode exactly --max-new-tokens steps in every batch (end of sequence ignored), so "
                             "plain and edited runs do the same work even where the edit changes the answers")
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
        """(seconds, answers, decoded tokens) for all prompts."""
        t0 = time.perf_counter()
        texts, tokens = [], 0
        for i in range(0, len(prompts), args.batch_size):
            batch = prompts[i:i + args.batch_size]
            out, steps = decode_batch(lm, batch, args.max_new_tokens, args.fixed_length, edit)
            texts += out
            tokens += len(batch) * steps
        return time.perf_counter() - t0, texts, tokens

    _, plain_out, plain_tokens = answer_all(None)  # warm-up; greedy, so every repeat decodes the same
    _, edited_out, edited_tokens = answer_all(policy)
    same = sum(a == b for a, b in zip(plain_out, edited_out))
    plain, edited = [], []
    for _ in range(args.repeats):
        plain.append(answer_all(None)[0])
        edited.append(answer_all(policy)[0])
    t_plain, t_edit = statistics.median(plain), statistics.median(edited)
    ms_plain, ms_edit = 1e3 * t_plain / plain_tokens, 1e3 * t_edit / edited_tokens
    print(f"model {args.model}, {len(prompts)} questions, batch {args.batch_size}, {args.max_new_tokens} new tokens"
          f"{' (fixed length)' if args.fixed_length else ' (batch stops when every answer has ended)'}, "
          f"policy {'random SLIM (layer %d)' % policy.layer if not args.policy else args.policy}, "
          f"{torch.get_num_threads()} torch threads, median of {args.repeats}")
    print(f"unintervened : {t_plain:7.2f} s  ({t_plain / len(prompts):.3f} s a question, "
          f"{plain_tokens} decoded tokens, {ms_plain:.2f} ms a token)")
    print(f"with SLIM    : {t_edit:7.2f} s  ({t_edit / len(prompts):.3f} s a question, "
          f"{edited_tokens} decoded tokens, {ms_edit:.2f} ms a token)")
    print(f"overhead     : {100 * (t_edit / t_plain - 1):+.1f} % in time, {100 * (ms_edit / ms_plain - 1):+.1f} % "
          f"a decoded token  (kappa {policy.kappa:g}; {same}/{len(prompts)} generations identical to the "
          f"unintervened ones)")


if __name__ == "__main__":
    main()

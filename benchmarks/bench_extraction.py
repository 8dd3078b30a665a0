"""Head-activation extraction speed with SmolLM2: batched versus one text at a time, same run.

    python benchmarks/bench_extraction.py --n-texts 96 --batch-size 16

Prints texts/s both ways, their ratio, and the projected time for the whole
tqa_mc2 set (5,887 texts) at the batched rate.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from slim.data import probe_texts  # noqa: E402
from slim.data.activations import last_token_head_activations  # noqa: E402
from slim.data.truthfulqa import load_truthfulqa
from slim.models.loading import load_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135M")
    parser.add_argument("--n-texts", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tqa_dir", default=None)
    args = parser.parse_args()

    lm = load_model(args.model, device="cpu")
    texts_df = probe_texts(load_truthfulqa(args.tqa_dir), "tqa_mc2")
    rng = np.random.default_rng(0)
    texts = texts_df["text"].to_numpy()[rng.choice(len(texts_df), args.n_texts, replace=False)].tolist()
    texts.sort(key=len, reverse=True)  # as the cached extraction orders them
    last_token_head_activations(lm.model, lm.tokenizer, texts[:2])  # warm-up

    t0 = time.perf_counter()
    single = [last_token_head_activations(lm.model, lm.tokenizer, [t]) for t in texts]
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = [
        last_token_head_activations(lm.model, lm.tokenizer, texts[i : i + args.batch_size])
        for i in range(0, len(texts), args.batch_size)
    ]
    t_batched = time.perf_counter() - t0
    err = np.abs(np.concatenate(single) - np.concatenate(batched)).max()

    rate_single, rate_batched = len(texts) / t_single, len(texts) / t_batched
    print(f"model {args.model}, {len(texts)} tqa_mc2 texts, {torch.get_num_threads()} torch threads")
    print(f"one at a time : {rate_single:7.2f} texts/s ({1000 / rate_single:.0f} ms a text)")
    print(f"batched ({args.batch_size:>3}) : {rate_batched:7.2f} texts/s ({1000 / rate_batched:.0f} ms a text)")
    print(f"speed-up      : {rate_batched / rate_single:.2f}x   (max |batched - single| = {err:.1e})")
    print(f"whole tqa_mc2 ({len(texts_df)} texts) at the batched rate: {len(texts_df) / rate_batched / 60:.1f} min")


if __name__ == "__main__":
    main()

"""Time Linear-AcT's fit: its matched quantiles by np.quantile against one sort (slim.policies.linear_act).

A random problem shaped like SmolLM2-135M's probe texts on one fold (30 layers x 9 heads x 64 dimensions,
~2,900 untruthful and ~2,000 truthful rows: unequal counts, so the larger class is read at evenly spaced
quantiles). Fits every layer both ways, side by side in one run, prints both times, their ratio, and
whether the fitted maps agree bit for bit.

    python benchmarks/bench_linear_act_fit.py                       # SmolLM2's shape
    python benchmarks/bench_linear_act_fit.py --layers 18 --heads 4 --head-dim 256   # Gemma 3 270M's
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import slim.policies.linear_act as linear_act  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--layers", type=int, default=30)
parser.add_argument("--heads", type=int, default=9)
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--n-source", type=int, default=2900, help="untruthful rows")
parser.add_argument("--n-target", type=int, default=2000, help="truthful rows")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

rng = np.random.default_rng(args.seed)
labels = np.r_[np.ones(args.n_source, int), np.zeros(args.n_target, int)]
shape = (len(labels), args.layers, args.heads, args.head_dim)
acts = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)  # (N, L, H, d) as cached
acts[labels == 0] += np.float16(0.3)
print(f"{args.layers} layers x {args.heads} heads x {args.head_dim} dims, {args.n_source} / {args.n_target} rows")


def numpy_quantiles(x, n):
    return np.sort(x, axis=0) if len(x) == n else np.quantile(x, np.linspace(0.0, 1.0, n), axis=0)


fast = linear_act._quantiles
t0 = time.perf_counter()
one_sort = linear_act.fit_linear_act(acts, labels)
t_fast = time.perf_counter() - t0
linear_act._quantiles = numpy_quantiles
t0 = time.perf_counter()
by_quantile = linear_act.fit_linear_act(acts, labels)
t_numpy = time.perf_counter() - t0
linear_act._quantiles = fast

same = all(
    np.array_equal(getattr(one_sort, k).numpy(), getattr(by_quantile, k).numpy()) for k in ("omega", "beta", "lo", "hi")
)
print(f"np.quantile: {t_numpy:.1f} s   one sort: {t_fast:.1f} s   ratio {t_numpy / t_fast:.1f}x")
print(f"fitted maps bit for bit the same: {same}")

"""Time ITI's per-head probes: scikit-learn one head at a time against the batched torch solver.

A random problem shaped like SmolLM2-135M on TruthfulQA (30 layers x 9 heads = 270 heads, head size 64,
~4,700 train and ~1,200 val rows, float16 activations as on disk), each head with its own strength of a
class-dependent shift. Both fits are slim.policies.fit's (fit_iti's two solvers); the torch one runs on
--device (the CPU by default: on a GPU the same code is one batched program per block of heads). Prints
both times, their ratio, and how far the two agree (val accuracies, top-K heads, coefficients).

    python benchmarks/bench_iti_fit.py                     # 270 heads, both solvers on the CPU
    python benchmarks/bench_iti_fit.py --device cuda:0     # the torch solver on a GPU
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from slim.policies.fit import _iti_probes_sklearn, _iti_probes_torch  # noqa: E402
from slim.policies.logistic import torch_device  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--layers", type=int, default=30)
parser.add_argument("--heads", type=int, default=9)
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--n-train", type=int, default=4700)
parser.add_argument("--n-val", type=int, default=1200)
parser.add_argument("--top-k", type=int, default=48, help="ITI's num_heads, for the ranking comparison")
parser.add_argument("--device", default="cpu", help="where the torch solver runs")
parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

L, H, d, n_tr, n_val = args.layers, args.heads, args.head_dim, args.n_train, args.n_val
rng = np.random.default_rng(args.seed)
N = n_tr + n_val
truthful = rng.integers(0, 2, N)
strength = rng.uniform(0, 0.5, (L, H, 1))  # from useless heads to informative ones
direction = rng.standard_normal((L, H, d))
direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
acts = rng.standard_normal((N, L, H, d), dtype=np.float32) + truthful[:, None, None, None] * strength * direction
acts = acts.astype(np.float16)  # (N, L, H, d) as cached
train, val = np.arange(n_tr), np.arange(n_tr, N)
dev = torch_device(args.device)
print(f"{L} layers x {H} heads = {L * H} probes, d={d}, {n_tr} train / {n_val} val rows; torch on {dev}")

t0 = time.perf_counter()
acc_sk, coef_sk = _iti_probes_sklearn(acts, truthful, train, val, 0, None)
t_sk = time.perf_counter() - t0

_iti_probes_torch(acts[:, :1, :1], truthful, train, val, 0, dev)  # warm-up (CUDA context, kernels)
if dev.type == "cuda":
    torch.cuda.synchronize(dev)
t0 = time.perf_counter()
acc_t, coef_t = _iti_probes_torch(acts, truthful, train, val, 0, dev)
t_t = time.perf_counter() - t0

k = min(args.top_k, L * H)
top_sk = np.argsort(-acc_sk.ravel(), kind="stable")[:k]
top_t = np.argsort(-acc_t.ravel(), kind="stable")[:k]
print(f"scikit-learn (one head at a time): {t_sk:8.2f} s")
print(f"torch batched Newton ({dev.type}):      {t_t:8.2f} s")
print(f"speed-up:                          {t_sk / t_t:8.2f} x")
print(
    f"agreement: val accuracy equal on {(acc_sk == acc_t).mean():.1%} of heads "
    f"(largest gap {np.abs(acc_sk - acc_t).max() * n_val:.0f} val rows); top-{k} heads: "
    f"{len(set(top_sk) & set(top_t))} shared, same order: {bool((top_sk == top_t).all())}; "
    f"largest coefficient gap {np.abs(coef_sk - coef_t).max():.1e} (scikit-learn stops at tol 1e-4)"
)

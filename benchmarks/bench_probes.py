"""Time the batched probe trainer against the one-probe-at-a-time reference.

A random problem shaped like SmolLM2-135M on TruthfulQA (30 layers x 9 heads,
head size 64, ~4,700 train and ~1,200 val rows, float16 activations as on
disk). Both trainers start from the same initial weights; the loop uses
nn.Linear + torch.optim.Adam + autograd (slim.probes.fit_one_probe).

    python benchmarks/bench_probes.py                      # defaults below
    python benchmarks/bench_probes.py --loop-probes 270    # time the whole loop
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from slim.probes import RiskAwareProbes, fit_one_probe, init_weights  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--layers", type=int, default=30)
parser.add_argument("--heads", type=int, default=9)
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--n-train", type=int, default=4700)
parser.add_argument("--n-val", type=int, default=1200)
parser.add_argument("--epochs", type=int, default=1000)
parser.add_argument("--loss-type", default="risk", choices=["risk", "cross_entropy", "l2"])
parser.add_argument("--loop-probes", type=int, default=10,
                    help="probes the reference loop trains; its time is extrapolated to all P (0 = skip)")
parser.add_argument("--block-size", type=int, default=None, help="probes per batched block (default: auto)")
parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

# -----------------------------------------------------------------------------
# data: each probe sees a weak class-dependent shift of Gaussian noise
L, H, d = args.layers, args.heads, args.head_dim
P = L * H
rng = np.random.default_rng(args.seed)
shift = (0.1 * rng.standard_normal((L, H, d))).astype(np.float32)


def make(n):
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((n, L, H, d), dtype=np.float32) + y[:, None, None, None] * shift
    return X.astype(np.float16), y


X, y = make(args.n_train)
X_val, y_val = make(args.n_val)
print(f"problem: P = {L} x {H} = {P} probes, d = {d}, {args.n_train} train / {args.n_val} val rows, "
      f"{args.epochs} epochs, loss {args.loss_type}, torch {torch.__version__}, {torch.get_num_threads()} threads")

# -----------------------------------------------------------------------------
# batched: every probe at once
t0 = time.perf_counter()
probes = RiskAwareProbes(loss_type=args.loss_type, epochs=args.epochs, seed=args.seed,
                         block_size=args.block_size).fit(X, y, X_val, y_val)
t_batched = time.perf_counter() - t0
print(f"batched: {t_batched:.1f} s for all {P} probes "
      f"(mean best val loss {probes.best_val_loss_.mean():.4f})")

# -----------------------------------------------------------------------------
# reference loop: one probe at a time, data preparation included as in the batched run
K = min(args.loop_probes, P)
if K > 0:
    w0, b0 = init_weights(P, d, args.seed)
    Xf, Xvf = X.reshape(len(X), P, d), X_val.reshape(len(X_val), P, d)
    max_diff = 0.0
    t0 = time.perf_counter()
    for p in range(K):
        x = torch.from_numpy(Xf[:, p].astype(np.float32))
        xv = torch.from_numpy(Xvf[:, p].astype(np.float32))
        w, b, _, _ = fit_one_probe(x, y, xv, y_val, w0[p], b0[p], loss_type=args.loss_type,
                                   epochs=args.epochs)
        max_diff = max(max_diff, (w - probes.coef_[p]).abs().max().item())
    t_loop = (time.perf_counter() - t0) * P / K
    how = "measured" if K == P else f"EXTRAPOLATED from {K} of {P} probes (x {P / K:.1f})"
    print(f"loop:    {t_loop:.1f} s for all {P} probes, {how}")
    print(f"speed-up of batched over loop: {t_loop / t_batched:.1f}x")
    print(f"max |weight difference| on the {K} looped probes (float32): {max_diff:.2e}")

"""Time the batched probe trainer against the one-probe-at-a-time reference.

A random problem shaped like SmolLM2-135M on TruthfulQA (30 layers x 9 heads,
head size 64, ~4,700 train and ~1,200 val rows, float16 activations as on
disk). Both trainers start from the same initial weights; the loop uses
nn.Linear + torch.optim.Adam + autograd (slim.stage1.probes.fit_one_probe).

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
from slim.stage1.probes import RiskAwareProbes, fit_one_probe, init_weights  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--layers", type=int, default=30)
parser.add_argument("--heads", type=int, default=9)
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--n-train", type=int, default=4700)
parser.add_argument("--n-val", type=int, default=1200)
parser.add_argument("--epochs", type=int, default=1000)
parser.add_argument("--loss-type", default="risk", choices=["risk", "cross_entropy", "l2"])
parser.add_argument(
    "--loop-probes",
    type=int,
    default=10,
    help="probes the reference loop trains; its time is extrapolated to all P (0 = skip)",
)
parser.add_argument("--block-size", type=int, default=None, help="probes per batched block (default: auto)")
parser.add_argument(
    "--jobs",
    type=int,
    default=None,
    help="blocks trained at once by the batched trainer (default: torch's thread count)",
)
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
print(
    f"problem: P = {L} x {H} = {P} probes, d = {d}, {args.n_train} train / {args.n_val} val rows, "
    f"{args.epochs} epochs, loss {args.loss_type}, torch {torch.__version__}, {torch.get_num_threads()} threads"
)

print(
    f"machine: {os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.1f} "
    "(wall times stretch when other processes share the cores; CPU times less so)"
)


class Timer:
    """Wall and CPU time (all threads of this process) of a with-block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


# warm-up, untimed: the first torch calls of a process (autograd, BLAS, thread
# pools) take seconds, which would be charged to whichever trainer ran first
x0, xv0 = torch.from_numpy(X[:50, 0, 0].astype(np.float32)), torch.from_numpy(X_val[:50, 0, 0].astype(np.float32))
fit_one_probe(x0, y[:50], xv0, y_val[:50], init_weights(1, d)[0][0], epochs=3)
RiskAwareProbes(epochs=3).fit(X[:50, :1], y[:50], X_val[:50, :1], y_val[:50])

# -----------------------------------------------------------------------------
# batched: every probe at once
with Timer() as tb:
    probes = RiskAwareProbes(
        loss_type=args.loss_type, epochs=args.epochs, seed=args.seed, block_size=args.block_size, n_jobs=args.jobs
    ).fit(X, y, X_val, y_val)
print(
    f"batched: wall {tb.wall:.1f} s, CPU {tb.cpu:.1f} s for all {P} probes "
    f"(mean best val loss {probes.best_val_loss_.mean():.4f})"
)

# -----------------------------------------------------------------------------
# reference loop: one probe at a time, data preparation included as in the batched run
K = min(args.loop_probes, P)
if K > 0:
    w0, b0 = init_weights(P, d, args.seed)
    Xf, Xvf = X.reshape(len(X), P, d), X_val.reshape(len(X_val), P, d)
    max_diff, same_epoch = 0.0, 0
    with Timer() as tl:
        for p in range(K):
            x = torch.from_numpy(Xf[:, p].astype(np.float32))
            xv = torch.from_numpy(Xvf[:, p].astype(np.float32))
            w, b, epoch, _ = fit_one_probe(x, y, xv, y_val, w0[p], b0[p], loss_type=args.loss_type, epochs=args.epochs)
            max_diff = max(max_diff, (w - probes.coef_[p]).abs().max().item())
            same_epoch += epoch == int(probes.best_epoch_[p])
    scale = P / K
    how = "measured" if K == P else f"EXTRAPOLATED from {K} of {P} probes (x {scale:.1f})"
    print(f"loop:    wall {tl.wall * scale:.1f} s, CPU {tl.cpu * scale:.1f} s for all {P} probes, {how}")
    print(f"speed-up of batched over loop: wall {tl.wall * scale / tb.wall:.1f}x, CPU {tl.cpu * scale / tb.cpu:.1f}x")
    print(
        f"on the {K} looped probes (float32): max |weight difference| {max_diff:.2e}, "
        f"same checkpoint epoch for {same_epoch} of {K}"
    )
print(f"load average after: {os.getloadavg()[0]:.1f}")

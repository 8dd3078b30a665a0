"""Stage 1: layer-wise risk-aware probes (paper section 2).

One logistic probe per (layer, head) reads that head's last-token activation
and outputs p = sigmoid(theta0 + theta . a) = P(undesirable); label y = 1 means
undesirable (untruthful), y = 0 desirable. The P = L*H probes are independent,
so they are trained together as one batched tensor program (on CPU, one
program per cache-sized block of probes; see RiskAwareProbes.block_size):

    XT    (P, d+1, N_train + N_val)   activations, transposed, with a row of ones
    theta (P, d+1)                    [weights | bias] of every probe
    z     (P, 1, N_train + N_val)     = bmm(theta, XT), all logits in one call

The gradient of all three loss types is written by hand (it is a per-row
scalar times the activation), Adam is applied in place, and after every epoch
the hard validation loss FPR + bl*FNR is recorded. The kept parameters are
the last epoch's (`checkpoint="last"`, what the published code ends up
using: it saves `clf.state_dict()` without a copy, and Adam keeps updating
those live tensors) or the best-validation epoch's (`"best"`, the paper's
description).
`fit_one_probe` (in slim.stage1.losses, imported here) is the plain nn.Linear +
Adam + autograd reference that the tests and the benchmark compare against.

The losses and their gradient are in `slim.stage1.losses`, the layer detector built
from the trained probes in `slim.stage1.detector`.
"""

import contextlib
import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..config import ProbeConfig
from ..io import reading, write_checked
from .losses import fit_one_probe, logit_grad, risk_from_counts, row_coef

__all__ = ["RiskAwareProbes", "fit_one_probe", "init_weights", "load_probes", "save_probes", "as_tensor"]

# torch.optim.Adam defaults, repeated by the in-place batched Adam below
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8

# -----------------------------------------------------------------------------
# initialisation (the one-probe reference trainer, fit_one_probe, is in slim.stage1.losses)


def init_weights(P, d, seed=0):
    """Initial (weight (P, d), bias (P,)) as float32, from torch.Generator(seed).

    Each row is what torch.nn.init.xavier_uniform_ draws for a Linear(d, 1):
    U(-a, a) with a = sqrt(6 / (d + 1)); biases start at zero. Both trainers
    start from these, so they can be compared probe by probe.
    """
    gen = torch.Generator().manual_seed(seed)
    bound = math.sqrt(6.0 / (d + 1))
    weight = torch.empty(P, d).uniform_(-bound, bound, generator=gen)
    return weight, torch.zeros(P)


# -----------------------------------------------------------------------------
# input checks


def as_tensor(a, name):
    if isinstance(a, torch.Tensor):
        return a.detach()
    try:
        return torch.from_numpy(np.ascontiguousarray(a))
    except TypeError as e:
        raise ValueError(f"{name} must be a numpy array or torch tensor ({e})") from None


def _check_labels(y, n, name):
    y = as_tensor(y, name)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the activations, got {tuple(y.shape)}")
    if not ((y == 0) | (y == 1)).all():  # NaN fails this too
        raise ValueError(f"{name} must be binary: 0 = desirable, 1 = undesirable")
    n1 = int((y == 1).sum())
    if n1 == 0 or n1 == n:
        raise ValueError(
            f"{name} needs both labels (has {n1} positives of {n}); FPR and FNR are "
            "undefined otherwise, re-split the folds"
        )
    return y


def _check_activations(X, name, n_probes=None, d=None):
    """(N, P, d) or (N, L, H, d) -> tensor (N, P, d) and the probe grid, (P,) or (L, H)."""
    X = as_tensor(X, name)
    if X.ndim not in (3, 4):
        raise ValueError(f"{name} must have shape (N, P, d) or (N, L, H, d), got {tuple(X.shape)}")
    if not X.is_floating_point():
        raise ValueError(f"{name} must hold floats (activations), got dtype {X.dtype}")
    grid = tuple(X.shape[1:-1])
    X = X.reshape(X.shape[0], -1, X.shape[-1])
    if n_probes is not None and (X.shape[1], X.shape[2]) != (n_probes, d):
        raise ValueError(
            f"{name} has {X.shape[1]} probes of size {X.shape[2]} (shape {tuple(grid)} x {X.shape[2]}), "
            f"expected {n_probes} of size {d} as in the training activations"
        )
    if X.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    return X, grid


# -----------------------------------------------------------------------------
# the batched trainer


@contextlib.contextmanager
def _exact_float32_matmul(dev):
    """On CUDA, float32 matmuls without TF32 while the probes train (TF32 keeps 10 mantissa bits: the
    probes would drift from the CPU's by ~1e-3 if another part of the process switched it on)."""
    if dev.type != "cuda":
        yield
        return
    flag = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


class RiskAwareProbes:
    """P independent logistic probes trained at once (scikit-learn style).

    loss_type  "risk" (paper eq. 2), "cross_entropy" or "l2" (ablations)
    bl         weight of FNR in the risk loss and in the hard selection loss (paper's alpha)
    beta       L2 penalty on the slopes
    epochs, lr full-batch Adam steps and learning rate
    seed       seed of the Xavier-uniform initial weights (see init_weights)
    checkpoint "last" (published code): keep the parameters after the last
               epoch; "best" (paper): those of the earliest epoch with the
               lowest hard validation loss
    device     torch device
    dtype      "float32" or "float64" (float64 for exact comparisons)
    block_size probes per block: the P probes are trained in blocks of this
               many, each block one batched program for all epochs. On CPU a
               block small enough to stay in the cache through all epochs is
               several times faster than streaming every probe's activations
               from memory each epoch. None = about 6 MiB of activations per
               block on CPU, all probes in one block on GPU.
    n_jobs     CPU only: blocks trained at once, in threads, each running its
               torch ops single-threaded (a cache-sized block is too small to
               split across threads: doing so was over 30x slower on a busy
               2-core machine). None = torch.get_num_threads(). On a machine
               whose cores are already busy with other work, n_jobs=1 can be
               faster. While fit runs on CPU, torch's intra-op thread count is
               1 (restored afterwards); results do not depend on n_jobs.

    After fit: coef_ (P, d), intercept_ (P,) the kept parameters; epoch_ (P,)
    their epoch in 1..epochs and val_loss_ (P,) their hard validation loss;
    best_epoch_ (P,) and best_val_loss_ (P,) the best-validation epoch and
    loss (whichever checkpoint is kept); n_features_in_ = d, probe_shape_ =
    (P,) or (L, H).
    """

    def __init__(
        self,
        loss_type="risk",
        bl=1.0,
        beta=0.0,
        epochs=1000,
        lr=2e-3,
        seed=0,
        device="cpu",
        dtype="float32",
        block_size=None,
        n_jobs=None,
        checkpoint="last",
    ):
        self.loss_type = loss_type
        self.bl = bl
        self.beta = beta
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.n_jobs = n_jobs
        self.checkpoint = checkpoint

    def _check_params(self):
        # the settings shared with the stage-1 config, checked there
        ProbeConfig(self.loss_type, self.bl, self.beta, self.epochs, self.lr, self.seed, self.checkpoint)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.block_size is not None and (int(self.block_size) != self.block_size or self.block_size < 1):
            raise ValueError(f"block_size must be None or an integer >= 1, got {self.block_size}")
        if self.n_jobs is not None and (int(self.n_jobs) != self.n_jobs or self.n_jobs < 1):
            raise ValueError(f"n_jobs must be None or an integer >= 1, got {self.n_jobs}")
        dev = self._device()
        if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
            raise ValueError(f"device {self.device}: no such CUDA device here; train the probes with --device cpu")

    def _device(self):
        # "N" (--device N, as the published scripts pass it) is GPU N
        try:
            return torch.device(f"cuda:{self.device}" if str(self.device).isdigit() else self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'cpu', 'cuda:N' or a GPU index N, got {self.device!r}") from None

    def _block_size(self, P, d, n_total, src_bytes=4):
        if self.block_size is not None:
            return int(self.block_size)
        dev = self._device()
        if dev.type == "cuda":
            # every probe at once unless their buffers would pass 60 % of the GPU's free memory: per probe
            # XT and 4 rows of logits-sized buffers in dt, the history, and the rows as they arrive (src_bytes)
            size = 8 if self.dtype == "float64" else 4
            hist = (self.epochs + 1) * ((d + 1 if self.checkpoint == "best" else 0) + 2)
            per_probe = size * ((d + 1) * n_total + 4 * n_total + hist + 4 * (d + 1)) + src_bytes * d * n_total
            free, _ = torch.cuda.mem_get_info(dev)
            return max(1, min(P, int(0.6 * free) // per_probe))
        if dev.type != "cpu":
            return P
        # about 6 MiB of activations per block stays in the last-level cache
        # (measured on a 2-core EPYC VM: 4 SmolLM2 probes per block was fastest)
        per_probe = (d + 1) * n_total * (8 if self.dtype == "float64" else 4)
        return max(1, min(P, (6 << 20) // per_probe))

    def fit(self, X, y, X_val, y_val):
        """X (N, P, d) or (N, L, H, d) training activations; y (N,) labels; same for val."""
        self._check_params()
        X, grid = _check_activations(X, "X")
        X_val, _ = _check_activations(X_val, "X_val", X.shape[1], X.shape[2])
        y = _check_labels(y, X.shape[0], "y")
        y_val = _check_labels(y_val, X_val.shape[0], "y_val")
        dt = getattr(torch, self.dtype)
        dev = self._device()
        N, P, d = X.shape
        n_total = N + X_val.shape[0]
        y = y.to(dev, dt)
        pos_val = y_val.to(dev).bool()
        weight, bias = init_weights(P, d, self.seed)
        theta0 = torch.cat([weight, bias.unsqueeze(1)], 1).to(dev, dt)  # (P, d+1)

        B = self._block_size(P, d, n_total, X.element_size())

        def train(s):  # one block of probes s..e-1: one batched program
            e = min(P, s + B)
            x, x_val = X[:, s:e], X_val[:, s:e]
            if dev.type != "cpu":
                # the rows cross to the device once, in their stored dtype (float16: half the bytes of
                # float32); the transpose and the cast below then run there
                x, x_val = x.to(dev), x_val.to(dev)
            # (B, d+1, N + N_val): train columns, then val columns, then a row
            # of ones so the bias is one more weight; cast from float16 here
            XT = torch.empty(e - s, d + 1, n_total, dtype=dt, device=dev)
            XT[:, :d, :N] = x.permute(1, 2, 0)
            XT[:, :d, N:] = x_val.permute(1, 2, 0)
            XT[:, d, :] = 1
            del x, x_val
            # a NaN or inf anywhere makes the sum non-finite; far cheaper than isfinite().all()
            if not torch.isfinite(XT.sum()):
                raise ValueError(
                    f"X or X_val holds NaN/inf (or huge values) for probes {s}..{e - 1}; check the activation cache"
                )
            return self._train_block(XT, N, y, pos_val, theta0[s:e])

        starts = range(0, P, B)
        if dev.type == "cpu":
            n_jobs = self.n_jobs or torch.get_num_threads()
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(max_workers=min(n_jobs, len(starts))) as pool:
                    results = list(pool.map(train, starts))
            finally:
                torch.set_num_threads(threads)
        else:
            with _exact_float32_matmul(dev):
                results = [train(s) for s in starts]
        theta, epoch, loss, best_epoch, best_loss = (torch.cat(r) for r in zip(*results))

        self.coef_ = theta[:, :d]
        self.intercept_ = theta[:, d]
        self.epoch_ = epoch
        self.val_loss_ = loss
        self.best_epoch_ = best_epoch
        self.best_val_loss_ = best_loss
        self.n_features_in_ = d
        self.probe_shape_ = grid
        return self

    def _train_block(self, XT, N, y, pos_val, theta):
        """Train the probes of one block. XT (B, d+1, N_total), theta (B, d+1) initial.

        Returns the kept parameters (B, d+1), their epoch (B,) and hard val loss (B,),
        then the best-validation epoch (B,) and its loss (B,).
        """
        B, d1, n_total = XT.shape
        E = self.epochs
        bl, beta, lr = float(self.bl), float(self.beta), float(self.lr)
        coef = row_coef(self.loss_type, y, bl)  # (N,)
        XT_train_T = XT[:, :, :N].transpose(1, 2)  # (B, N, d+1), a view
        # val labels as indicator columns: pred (B, N_val) @ [neg, pos] counts FP and TP
        val_ind = torch.stack([~pos_val, pos_val], 1).to(XT.dtype)  # (N_val, 2)

        # every buffer allocated once; the loop below only writes into them
        theta = theta.clone()
        m, v, denom, grad = (torch.zeros_like(theta) for _ in range(4))
        z = torch.empty(B, n_total, dtype=XT.dtype, device=XT.device)
        g, tmp = torch.empty_like(z[:, :N]), torch.empty_like(z[:, :N])
        pred = torch.empty_like(z[:, N:])
        # per-epoch record of parameters and val counts: picking the checkpoint
        # afterwards costs two ops per epoch instead of a dozen; "last" keeps
        # the final parameters, so it needs no parameter history
        keep_hist = self.checkpoint == "best"
        theta_hist = torch.empty(E + 1 if keep_hist else 0, B, d1, dtype=XT.dtype, device=XT.device)
        counts_hist = torch.zeros(E + 1, B, 2, dtype=XT.dtype, device=XT.device)
        theta3, z3, g3, grad3 = theta.unsqueeze(1), z.unsqueeze(1), g.unsqueeze(1), grad.unsqueeze(1)
        p_train, p_val = z[:, :N], z[:, N:]  # sigmoid is applied to z in place

        # iteration t: logits of the parameters after t Adam steps; the val part
        # scores them (epoch t), the train part gives step t+1
        for t in range(E + 1):
            torch.bmm(theta3, XT, out=z3)
            torch.sigmoid(z, out=z)
            if t > 0:
                torch.gt(p_val, 0.5, out=pred)
                torch.mm(pred, val_ind, out=counts_hist[t])
                if keep_hist:
                    theta_hist[t].copy_(theta)
            if t == E:
                break
            # hand-written gradient: dL/dz per row, then one bmm for all probes
            logit_grad(self.loss_type, p_train, y, coef, g, tmp)
            torch.bmm(g3, XT_train_T, out=grad3)
            if beta:
                grad[:, :-1].add_(theta[:, :-1], alpha=2 * beta)
            # Adam in place, the same arithmetic as torch.optim.Adam
            step = t + 1
            m.lerp_(grad, 1 - ADAM_BETA1)
            v.mul_(ADAM_BETA2).addcmul_(grad, grad, value=1 - ADAM_BETA2)
            torch.sqrt(v, out=denom)
            denom.div_(math.sqrt(1 - ADAM_BETA2**step)).add_(ADAM_EPS)
            theta.addcdiv_(m, denom, value=-lr / (1 - ADAM_BETA1**step))

        # hard val loss of every epoch 1..E from exact integer counts; the
        # earliest epoch with the lowest loss wins (np.argmin returns the first).
        # The loop above never reads a value back: on a GPU it is all queued, and syncs once here
        counts = counts_hist[1:].double().cpu()  # (E, B, 2)
        n1v = int(pos_val.sum())
        n0v = pos_val.numel() - n1v
        losses = risk_from_counts(counts[..., 0], n1v - counts[..., 1], n0v, n1v, bl).numpy()
        best = torch.from_numpy(np.argmin(losses, axis=0))  # (B,) index into epochs 1..E
        kept = best if keep_hist else torch.full_like(best, E - 1)
        rows = torch.arange(B)
        return (
            theta_hist[1:][kept.to(XT.device), rows.to(XT.device)].cpu() if keep_hist else theta.cpu(),
            kept + 1,
            torch.from_numpy(losses[kept.numpy(), rows.numpy()]),
            best + 1,
            torch.from_numpy(losses[best.numpy(), rows.numpy()]),
        )

    def decision_function(self, X):
        """Logits theta0 + theta . a: (N, P) for X (N, P, d), (N, L, H) for X (N, L, H, d)."""
        if not hasattr(self, "coef_"):
            raise ValueError("this RiskAwareProbes is not fitted yet; call fit first")
        X, grid = _check_activations(X, "X", self.coef_.shape[0], self.n_features_in_)
        # in the dtype the probes were trained in; float16 activations are cast here
        z = torch.einsum("npd,pd->np", X.to(self.coef_.dtype), self.coef_) + self.intercept_
        if not torch.isfinite(z).all():
            raise ValueError("X holds NaN/inf (or huge values): the logits are not finite; check the activation cache")
        return z.reshape(X.shape[0], *grid)

    def predict_proba(self, X):
        """P(undesirable) of every probe: (N, P) for X (N, P, d), (N, L, H) for (N, L, H, d)."""
        return torch.sigmoid(self.decision_function(X))

    def predict(self, X):
        """Head votes p > 0.5 as bool, same shape as predict_proba."""
        return self.predict_proba(X) > 0.5


# -----------------------------------------------------------------------------
# persistence: safetensors (no pickle), metadata as one JSON string


def save_probes(path, weight, bias, tau, meta=None):
    """Write weight (L, H, d), bias (L, H), tau (L,) and a JSON-able meta dict to path.

    Atomic: written to a temporary file beside path, then moved over it; its
    size and sha256 go to `<path>.sha256.json` for load_probes to check. Stage 1
    puts its ProbeConfig in meta["config"], so a file says which checkpoint
    ("last" or "best") it holds.
    """
    from safetensors.torch import save_file

    weight = as_tensor(weight, "weight").to(torch.float32).contiguous()
    bias = as_tensor(bias, "bias").to(torch.float32).contiguous()
    tau = as_tensor(tau, "tau").to(torch.int64).contiguous()
    if weight.ndim != 3 or bias.shape != weight.shape[:2] or tau.shape != weight.shape[:1]:
        raise ValueError(
            f"expected weight (L, H, d), bias (L, H), tau (L,); got {tuple(weight.shape)}, "
            f"{tuple(bias.shape)}, {tuple(tau.shape)}"
        )
    try:
        meta_json = json.dumps(meta or {})
    except TypeError as e:
        raise ValueError(f"meta must be JSON-serialisable (plain numbers, strings, lists, dicts): {e}") from None
    write_checked(
        path, lambda tmp: save_file({"weight": weight, "bias": bias, "tau": tau}, tmp, metadata={"meta": meta_json})
    )


def load_probes(path):
    """Read what save_probes wrote: (weight (L, H, d), bias (L, H), tau (L,), meta dict).

    A file that differs from its record or does not parse raises DamagedArtefact (slim.io).
    """
    from safetensors import safe_open

    with reading(path, "delete it to train the probes again (choose_edited_layer.py)."):
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            return f.get_tensor("weight"), f.get_tensor("bias"), f.get_tensor("tau"), meta

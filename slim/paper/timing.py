"""Running time of SLIM's parts on a run's own data: the paper's Table 4, measured (the overhead in
slim.paper.overhead, the table in slim.paper.table4).

Each function times the computation the pipeline itself runs, on the arrays
the pipeline uses (the cached head activations, stage 1's probes, the run's
ProbeConfig and SlimConfig), never a stand-in:

    time_layer_probes   stage 1's trainer (RiskAwareProbes, the run's loss, epochs, lr and checkpoint) on one
                        layer's H heads: the fold's train rows, validated every epoch on its val rows, as stage
                        1 does (the paper's "probe for one layer")
    time_head_map       the OT map of one head of the edited layer (fit_layer_maps on that head's slice: its
                        flagged rows, their covariance, the closed-form solve, the map), the run's gamma, cov and
                        min_samples (the paper's "compute intervention vector for one head")
    time_layer_maps     the same for all H heads of the layer, as slim_for_fold fits them
    time_iti_layer      for comparison, ITI's fit (fit_iti) restricted to one layer: H logistic probes, then a
                        class-mean direction and a sigma per head
    paired_overhead     the same questions answered with and without a fitted policy (the paper's "increase
                        in inference time per answer")

Every timing runs once untimed (warm-up: caches, allocator, lazy imports),
then `repeats` times; a Timing keeps every value, and reports the median and
the range (min to max). Reading the activations from the cache is outside
every timing; so is building the shared prompt's key/value cache, which
`answer_questions` builds once per answer file, the same for both arms.

Inference overhead: the questions are cut into batches; each batch is
answered plain and with the policy attached back to back, the order
alternating from pair to pair (and from repeat to repeat), so that a slow
spell of a shared machine falls on both halves of a pair alike. The
increase is taken per pair and summarised by its median over all pairs.

An edit changes what the model says, and so how long it talks: a batch
stops once every answer is closed (or every row has reached the end of
sequence), so the edited half of a pair may decode more or fewer tokens
than the plain half. Two figures are therefore reported for every pair:

    per answer         edited time / plain time of the same batch, minus 1:
                       what a user waits more per answer, the edit's cost and
                       its effect on answer length together;
    per decoded token  (edited time / edited decoded tokens) / (plain time /
                       plain decoded tokens), minus 1: the cost of the
                       computation alone, whatever the answers' lengths.

The headline (Table 4's row) is the per-decoded-token increase: it is the
cost the paper's claim is about ("our intervention only slightly increases
the inference running time"), and it does not move when an edit makes a
model terser or wordier. The per-answer increase is reported beside it. A
decoded token is one (row, step) position the model computed: under
`model.generate` every row of the batch runs every step; on the pipeline's
path (shared-prompt cache, stop at the answer) a row leaves the batch when
its answer is closed, so the count is the sum of the rows' lengths.
`--kappa 0` in benchmarks/bench_overhead.py (the edit computes everything
and moves nothing) and `fixed_length` (every batch decodes exactly
max_new_tokens steps) are two further ways to take the answer length out.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..config import ProbeConfig, SlimConfig, check_int

log = logging.getLogger(__name__)

# The paper's Table 4, LLaMA-7B column (one NVIDIA A5000 GPU): quoted for reference, never measured here.
PAPER_TABLE4 = {
    "model": "LLaMA-7B",
    "hardware": "one NVIDIA A5000 GPU",
    "probe_layer_s": 15.64,
    "head_map_s": 52.33,
    "inference_increase_pct": 3.09,
}


@dataclass
class Timing:
    """Repeated measurements of one component, in `unit` ("s" or "%"), with what was measured in `meta`."""

    values: list[float]
    unit: str = "s"
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    @property
    def min(self) -> float:
        return float(min(self.values))

    @property
    def max(self) -> float:
        return float(max(self.values))

    def quartiles(self) -> tuple[float, float, float]:
        if self.n < 2:
            return (self.values[0],) * 3
        q1, q2, q3 = statistics.quantiles(self.values, n=4)
        return float(q1), float(q2), float(q3)

    def as_dict(self) -> dict:
        return {
            "unit": self.unit,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "n": self.n,
            "values": [float(v) for v in self.values],
            **self.meta,
        }


def _sync() -> None:
    """Wait for queued GPU work, so that a clock read after it counts it (no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


@contextlib.contextmanager
def _quiet():
    """Repeats after the warm-up do not repeat its warnings (a jittered covariance, a slow solver)."""
    loggers = [logging.getLogger(name) for name in ("slim", "py.warnings")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def repeat_timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[Timing, object]:
    """Run `fn` `warmup` times untimed, then `repeats` times timed: (Timing in seconds, the last result)."""
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    result = None
    for _ in range(warmup):
        result = fn()
    values = []
    with _quiet() if warmup else contextlib.nullcontext():
        for _ in range(repeats):
            _sync()
            start = time.perf_counter()
            result = fn()
            _sync()
            values.append(time.perf_counter() - start)
    return Timing(values, "s"), result


# -----------------------------------------------------------------------------
# stage 1 and the maps


def time_layer_probes(
    acts: np.ndarray,
    labels: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    layer: int,
    cfg: ProbeConfig,
    device: str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
) -> Timing:
    """Stage 1's probes of one layer: RiskAwareProbes with the run's settings on acts[:, layer] (N, H, d).

    `acts` (N, L, H, d) is the activation cache (float16, as stage 1 reads it), `labels` (N,) 1 = undesirable,
    `train_rows` / `val_rows` the fold's rows (stage 1 validates every epoch on the val rows, so they are part
    of the work). The rows are read into memory before the clock starts.
    """
    from ..stage1.probes import RiskAwareProbes

    train_rows, val_rows = np.sort(np.asarray(train_rows)), np.sort(np.asarray(val_rows))
    X_train, X_val = np.asarray(acts[train_rows, layer]), np.asarray(acts[val_rows, layer])
    y_train, y_val = np.asarray(labels)[train_rows], np.asarray(labels)[val_rows]

    def fit():
        probes = RiskAwareProbes(
            cfg.loss_type, cfg.bl, cfg.beta, cfg.epochs, cfg.lr, cfg.seed, device=device, checkpoint=cfg.checkpoint
        )
        return probes.fit(X_train, y_train, X_val, y_val)

    timing, _ = repeat_timed(fit, repeats, warmup)
    timing.meta.update(
        layer=int(layer),
        heads=int(X_train.shape[1]),
        head_dim=int(X_train.shape[2]),
        train_rows=len(train_rows),
        val_rows=len(val_rows),
        epochs=cfg.epochs,
        loss_type=cfg.loss_type,
        device=str(device),
    )
    return timing


def _flagged(acts_layer: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(N, H) whether each head's probe flags each row (logit > 0), as fit_layer_maps decides."""
    return np.einsum("nhd,hd->nh", np.asarray(acts_layer, dtype=np.float64), weight) + bias > 0


def busiest_head(acts_layer: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> int:
    """The head whose probe flags the most rows (the largest covariance to fit; ties: the lowest index)."""
    return int(np.argmax(_flagged(acts_layer, weight, bias).sum(0)))


def time_head_map(
    acts_layer: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    head: int,
    cfg: SlimConfig,
    repeats: int = 3,
    warmup: int = 1,
) -> Timing:
    """SLIM's map of one head: fit_layer_maps on head `head`'s slice of acts_layer (N, H, d), weight (H, d),
    bias (H,): its flagged rows, their mean and covariance (cfg.cov), the closed-form solve (cfg.gamma) and
    the map; a head flagging fewer than cfg.min_samples rows gets the identity (its status says so)."""
    from ..policies.head_maps import fit_layer_maps

    H = np.asarray(weight).shape[0]
    check_int("head", head, 0, H - 1)
    one = slice(head, head + 1)
    acts_h, weight_h, bias_h = acts_layer[:, one], np.asarray(weight)[one], np.asarray(bias)[one]

    def fit():
        return fit_layer_maps(acts_h, weight_h, bias_h, cfg.gamma, cov=cfg.cov, min_samples=cfg.min_samples)

    timing, (_, _, infos) = repeat_timed(fit, repeats, warmup)
    info = infos[0]
    timing.meta.update(
        head=int(head),
        flagged_rows=int(info["n_samples"]),
        status=info["status"],
        rows=int(acts_layer.shape[0]),
        head_dim=int(acts_layer.shape[2]),
        gamma=cfg.gamma,
        cov=cfg.cov,
    )
    return timing


def time_layer_maps(
    acts_layer: np.ndarray, weight: np.ndarray, bias: np.ndarray, cfg: SlimConfig, repeats: int = 3, warmup: int = 1
) -> Timing:
    """All H maps of the layer, as slim_for_fold fits them (fit_layer_maps, without the cache file)."""
    from ..policies.head_maps import fit_layer_maps

    def fit():
        return fit_layer_maps(acts_layer, weight, bias, cfg.gamma, cov=cfg.cov, min_samples=cfg.min_samples)

    timing, (_, _, infos) = repeat_timed(fit, repeats, warmup)
    timing.meta.update(heads=len(infos), moved=sum(i["status"] == "moved" for i in infos), rows=int(len(acts_layer)))
    return timing


def time_iti_layer(
    acts: np.ndarray,
    truthful: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    layer: int,
    direction: str = "com",
    repeats: int = 3,
    warmup: int = 1,
) -> Timing:
    """ITI's fit on one layer's slice (slim.policies.mixed.iti_layer_shifts: fit_iti with every head chosen): a logistic
    probe per head on the train rows, scored on the val rows, then a direction and a sigma for each of the
    layer's H heads (sigma from the train+val rows, ITI's `same` tuning set: a projection, negligible beside the
    probes). The rows are read from the cache before the clock starts."""
    from ..policies.mixed import iti_layer_shifts

    train_rows, val_rows = np.sort(np.asarray(train_rows)), np.sort(np.asarray(val_rows))
    rows = np.concatenate([train_rows, val_rows])
    X = np.asarray(acts[rows, layer], dtype=np.float32)[:, None]  # (N, 1, H, d)
    y = np.asarray(truthful)[rows]
    n_train, H = len(train_rows), X.shape[2]
    local_train, local_val = np.arange(n_train), np.arange(n_train, len(rows))

    def fit():
        return iti_layer_shifts(X, y, local_train, local_val, 0, direction=direction)

    timing, _ = repeat_timed(fit, repeats, warmup)
    timing.meta.update(
        layer=int(layer), heads=int(H), train_rows=len(train_rows), val_rows=len(val_rows), direction=direction
    )
    return timing

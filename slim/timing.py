"""Running time of SLIM's parts on a run's own data: the paper's Table 4, measured.

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
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .config import ProbeConfig, SlimConfig, check_int
from .io import write_json, write_text

__all__ = [
    "PAPER_TABLE4",
    "Timing",
    "repeat_timed",
    "time_layer_probes",
    "busiest_head",
    "time_head_map",
    "time_layer_maps",
    "time_iti_layer",
    "timed_questions",
    "answer_setup",
    "decode_batch",
    "OverheadResult",
    "paired_overhead",
    "device_description",
    "table4_components",
    "table4_markdown",
    "write_table4",
]

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
    from .probes import RiskAwareProbes

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
    from .gaussian_ot import fit_layer_maps

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
    from .gaussian_ot import fit_layer_maps

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
    """ITI's fit on one layer's slice (slim.mixed.iti_layer_shifts: fit_iti with every head chosen): a logistic
    probe per head on the train rows, scored on the val rows, then a direction and a sigma for each of the
    layer's H heads (sigma from the train+val rows, ITI's `same` tuning set: a projection, negligible beside the
    probes). The rows are read from the cache before the clock starts."""
    from .mixed import iti_layer_shifts

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


# -----------------------------------------------------------------------------
# inference overhead


def timed_questions(questions: pd.DataFrame, split_idx: np.ndarray, n: int | None = None) -> pd.DataFrame:
    """The first `n` questions of a split (in the split's order, as --max_questions takes them), ordered as
    answer_questions batches them: longest question first."""
    from .evaluation import split_questions

    if n is not None:
        check_int("n_questions_timed", n, 1)
    qs = split_questions(questions, split_idx, n)
    return qs.iloc[np.argsort(-qs["Question"].str.len().to_numpy(), kind="stable")]


def answer_setup(lm, questions: pd.DataFrame, prefix_cache: bool = True, stop_at_answer: bool = True):
    """(prefix cache or None, stop_at_answer) as answer_questions would answer `questions`: the shared prompt's
    cache built once (untimed), both speed-ups off where the model's generation config needs model.generate."""
    from .generation import logit_settings, qa_prompt, shared_prefix
    from .prefix import PrefixCache

    if (prefix_cache or stop_at_answer) and logit_settings(lm.model):
        log.warning(
            "the generation config sets %s, which only model.generate applies: prompts run in full, "
            "without stopping at the answer.",
            ", ".join(logit_settings(lm.model)),
        )
        return None, False
    prefix = None
    if prefix_cache and len(questions):
        example = qa_prompt(questions["Question"].iloc[0])
        prefix = PrefixCache.build(lm.model, lm.tokenizer, shared_prefix(), example=example)
    return prefix, stop_at_answer


def decode_batch(
    lm,
    prompts: list[str],
    edit,
    max_new_tokens: int = 50,
    prefix=None,
    stop_at_answer: bool = False,
    answer_rule: str = "published",
    fixed_length: bool = False,
) -> tuple[list[str], int]:
    """Greedy continuations of a batch (text) and the number of decoded (row, step) positions.

    The path is generate_greedy's: `model.generate` on the full prompts when there is no `prefix` and no
    `stop_at_answer` (every row runs every step; `fixed_length` ignores the end of sequence, so the batch
    decodes exactly max_new_tokens steps), else the shared-prompt cache and/or stopping at the answer, each
    row leaving the batch when it ends.
    """
    from .generation import greedy_answer_tokens, greedy_tokens

    tok = lm.tokenizer
    if prefix is None and not stop_at_answer:
        new = greedy_tokens(
            lm.model, tok, prompts, max_new_tokens, edit, min_new_tokens=max_new_tokens if fixed_length else None
        )  # (batch, steps)
        return tok.batch_decode(new, skip_special_tokens=True), int(new.shape[0] * new.shape[1])
    if fixed_length:
        raise ValueError("fixed_length needs the model.generate path: no prefix cache and no stop at the answer.")
    new = greedy_answer_tokens(lm.model, tok, prompts, max_new_tokens, edit, prefix, stop_at_answer, answer_rule)
    return tok.batch_decode(new, skip_special_tokens=True), sum(len(t) for t in new)


@dataclass
class OverheadResult:
    """What paired_overhead measured. `pairs`: one dict per timed pair (batch, repeat, which half ran first,
    rows, seconds and decoded tokens of each half, seconds inside the edit when timed)."""

    prompts: list[str]  # in the order answered, batch after batch
    plain: list[str]  # the warm-up pass's continuations, aligned with prompts
    edited: list[str]
    pairs: list[dict]
    repeats: int
    batch_size: int
    firing_rate: float | None = None  # share of the timed edited positions at which SLIM's layer fired

    @property
    def same(self) -> int:
        """Continuations identical with and without the edit."""
        return sum(a == b for a, b in zip(self.plain, self.edited))

    @property
    def per_token(self) -> Timing:
        """The headline: % increase in time per decoded token, one value per pair."""
        vals = [
            100 * ((p["edited_s"] / p["edited_tokens"]) / (p["plain_s"] / p["plain_tokens"]) - 1) for p in self.pairs
        ]
        return Timing(vals, "%", {"pairs": len(vals)})

    @property
    def per_answer(self) -> Timing:
        """% increase in time per answer (the same rows both ways), one value per pair."""
        vals = [100 * (p["edited_s"] / p["plain_s"] - 1) for p in self.pairs]
        return Timing(vals, "%", {"pairs": len(vals)})

    @property
    def inside_edit(self) -> Timing | None:
        """Time inside the edit's own computation, % of the edited half's time, per pair (None: not timed)."""
        if not self.pairs or self.pairs[0].get("inside_s") is None:
            return None
        return Timing([100 * p["inside_s"] / p["edited_s"] for p in self.pairs], "%", {"pairs": len(self.pairs)})

    def totals(self) -> dict:
        """Seconds and decoded tokens of one pass over all questions each way (averaged over the repeats), and
        the increase of the summed times (not paired)."""
        r = self.repeats
        out = {k: sum(p[k] for p in self.pairs) / r for k in ("plain_s", "edited_s", "plain_tokens", "edited_tokens")}
        out["mean_increase_pct"] = 100 * (out["edited_s"] / out["plain_s"] - 1)
        calls = [p["inside_calls"] for p in self.pairs if p.get("inside_calls") is not None]
        if calls:
            out["inside_s"] = sum(p["inside_s"] for p in self.pairs) / r
            out["inside_calls"] = sum(calls) / r
        return out


def paired_overhead(
    lm,
    prompts: list[str],
    policy,
    batch_size: int = 64,
    max_new_tokens: int = 50,
    repeats: int = 3,
    prefix=None,
    stop_at_answer: bool = False,
    answer_rule: str = "published",
    fixed_length: bool = False,
    time_edit: bool = True,
    decode: Callable = decode_batch,
) -> OverheadResult:
    """Answer `prompts` in batches with and without `policy`, timed pair by pair (see the module docstring).

    One untimed pass each way first (warm-up; its continuations are returned). Then `repeats` rounds: every
    batch plain and edited back to back, the plain half first when (round + batch) is even. `time_edit` also
    clocks the policy's own `edit` (probes, detector, maps) inside the edited half; on a GPU that clock only
    sees the kernel launches, so pass False there. `decode(lm, prompts, edit, max_new_tokens, prefix,
    stop_at_answer, answer_rule, fixed_length)` -> (texts, decoded tokens) decodes one batch (decode_batch).
    """
    check_int("repeats", repeats, 1)
    check_int("batch_size", batch_size, 1)
    if not prompts:
        raise ValueError("paired_overhead needs at least one prompt.")
    batches = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    inside = {"s": 0.0, "calls": 0}
    wrapped = time_edit and "edit" not in vars(policy)  # a policy that already wraps its edit keeps its own

    if wrapped:
        body = policy.edit

        def timed_edit(*args, **kwargs):
            start = time.perf_counter()
            try:
                return body(*args, **kwargs)
            finally:
                inside["s"] += time.perf_counter() - start
                inside["calls"] += 1

        policy.edit = timed_edit  # attach() hands this attribute to the hook

    def run(batch, edit):
        inside.update(s=0.0, calls=0)
        _sync()
        start = time.perf_counter()
        texts, tokens = decode(lm, batch, edit, max_new_tokens, prefix, stop_at_answer, answer_rule, fixed_length)
        _sync()
        return time.perf_counter() - start, texts, max(int(tokens), 1), inside["s"], inside["calls"]

    try:
        plain = [t for b in batches for t in run(b, None)[1]]
        edited = [t for b in batches for t in run(b, policy)[1]]
        reset = getattr(policy, "reset_counts", None)
        if callable(reset):
            reset()  # count the timed passes only
        pairs = []
        for r in range(repeats):
            for j, batch in enumerate(batches):
                plain_first = (r + j) % 2 == 0
                got = {}
                for edit in (None, policy) if plain_first else (policy, None):
                    got["plain" if edit is None else "edited"] = run(batch, edit)
                (ps, _, pt, _, _), (es, _, et, ins, calls) = got["plain"], got["edited"]
                pairs.append(
                    dict(
                        batch=j,
                        repeat=r,
                        first="plain" if plain_first else "edited",
                        rows=len(batch),
                        plain_s=ps,
                        edited_s=es,
                        plain_tokens=pt,
                        edited_tokens=et,
                        inside_s=ins if wrapped else None,
                        inside_calls=calls if wrapped else None,
                    )
                )
    finally:
        if wrapped:
            del policy.edit
    rate = getattr(policy, "firing_rate", None)
    return OverheadResult(
        [p for b in batches for p in b],
        plain,
        edited,
        pairs,
        repeats,
        batch_size,
        firing_rate=rate() if callable(rate) else None,
    )


# -----------------------------------------------------------------------------
# the table


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_description(device: str) -> str:
    """The hardware the model ran on: the GPU name(s) from torch, or the CPU's model name and torch's threads."""
    device = str(device)
    if torch.cuda.is_available() and (device.startswith("cuda") or device == "auto"):
        indices = [int(device.split(":")[1])] if device.startswith("cuda:") else list(range(torch.cuda.device_count()))
        names = [torch.cuda.get_device_name(i) for i in indices]
        return f"GPU: {', '.join(names)} (CUDA {torch.version.cuda}); torch CPU threads: {torch.get_num_threads()}"
    return f"CPU: {_cpu_name()}; torch threads: {torch.get_num_threads()} of {os.cpu_count()} logical CPUs"


def table4_components(
    probes: Timing,
    head_map: Timing,
    overhead: OverheadResult,
    layer_maps: Timing | None = None,
    iti: Timing | None = None,
) -> list[dict]:
    """Table 4's rows in order: the paper's three (the inference row is the per-decoded-token increase), then
    this project's extras. Each row: key, component, unit, median, min, max, n (what n counts), values, paper."""
    H = probes.meta.get("heads", "H")
    rows = [
        ("probe_layer", "Probe for one layer (s)", probes, f"{probes.n} repeats", PAPER_TABLE4["probe_layer_s"]),
        (
            "head_map",
            "Compute intervention vector for one head (s)",
            head_map,
            f"{head_map.n} repeats",
            PAPER_TABLE4["head_map_s"],
        ),
        (
            "inference_per_token",
            "Increase in inference time per answer (%), per decoded token (headline)",
            overhead.per_token,
            f"{overhead.per_token.n} pairs",
            PAPER_TABLE4["inference_increase_pct"],
        ),
        (
            "inference_per_answer",
            "Increase in inference time per answer (%), whole answer as decoded",
            overhead.per_answer,
            f"{overhead.per_answer.n} pairs",
            None,
        ),
    ]
    if layer_maps is not None:
        rows.append(
            (
                "layer_maps",
                f"Intervention maps for all {H} heads of the layer (s)",
                layer_maps,
                f"{layer_maps.n} repeats",
                None,
            )
        )
    if iti is not None:
        rows.append(
            ("iti_layer", f"ITI, for comparison: fit for one layer's {H} heads (s)", iti, f"{iti.n} repeats", None)
        )
    if overhead.inside_edit is not None:
        t = overhead.inside_edit
        rows.append(("inside_edit", "Time inside the SLIM edit (% of edited decoding)", t, f"{t.n} pairs", None))
    return [
        {"key": key, "component": label, **timing.as_dict(), "n_counts": n, "paper": paper}
        for key, label, timing, n, paper in rows
    ]


def _number(x: float, unit: str, signed: bool = True) -> str:
    """Seconds to 3 significant digits (2 decimals from 1 s up); percentages to 2 decimals, increases signed."""
    if not math.isfinite(x):
        return str(x)
    if unit == "%":
        return f"{x:+.2f}" if signed else f"{x:.2f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def table4_markdown(header: dict, components: list[dict], notes: list[str] = ()) -> str:
    """The markdown page: a header list (command, date, model, device, versions), the table, then notes."""
    title = header.get("title", "Table 4: running time")
    lines = [f"# {title}", ""]
    for key, value in header.items():
        if key != "title":
            lines.append(f"- {key}: {value}")
    paper = f"paper: {PAPER_TABLE4['model']}, {PAPER_TABLE4['hardware']} (the paper's figures, not this run)"
    lines += [
        "",
        f"| component | this run (median) | spread (min to max) | n | {paper} |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in components:
        unit = c["unit"]
        signed = c["key"] != "inside_edit"  # a share of the time, not an increase
        low, mid, high = (_number(c[k], unit, signed) for k in ("min", "median", "max"))
        ref = "-" if c["paper"] is None else f"{c['paper']:g}"
        lines.append(f"| {c['component']} | {mid} | {low} to {high} | {c['n_counts']} | {ref} |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_table4(out: str | os.PathLike, header: dict, components: list[dict], notes: list[str] = (), details=None):
    """Write the markdown to `out` and the same content as JSON beside it (`out` with .json), atomically.
    Returns (markdown path, JSON path)."""
    out = Path(out)
    json_path = out.with_suffix(".json") if out.suffix else out.with_name(out.name + ".json")
    write_text(out, table4_markdown(header, components, notes))
    paper = {**PAPER_TABLE4, "source": "the paper's Table 4, quoted; not measured by this run"}
    record = {"header": header, "components": components, "notes": list(notes), "details": details or {}}
    write_json(json_path, {**record, "paper_table4": paper})
    return out, json_path

"""Fitting the intervention policies from the probe texts' activations: SLIM, ITI, MiMiC-style.

Each fit reads one fold's train+val rows (never its test questions). SLIM's
head maps and ITI's heads, directions and sigmas are the costly parts; both
are cached on disk and reused when fitted again with the same settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

import numpy as np

from ..config import ITI_SOLVERS, ITIConfig, SlimConfig, check_int
from ..data.activations import ProbeData
from ..io import DamagedArtefact, artefact_lock, kill_point, warn_rebuild
from ..stage1.fit import FoldProbes
from .base import Policy
from .gaussian_ot import ot_map, regularize_covariance, sqrtm_psd
from .head_maps import fit_layer_maps, load_layer_maps, save_layer_maps
from .iti import ITIPolicy
from .logistic import block_heads, fit_logistic, torch_device
from .mimic import MimicPolicy
from .slim import SlimPolicy

__all__ = [
    "fit_slim",
    "fit_iti",
    "fit_mimic",
    "fold_layer_activations",
    "slim_for_fold",
    "iti_for_fold",
    "iti_tuning_activations",
]

log = logging.getLogger(__name__)


def fit_slim(
    acts_layer: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    layer: int,
    tau: int,
    cfg: SlimConfig,
    fingerprint: dict | None = None,
    maps_path: Path | None = None,
    maps_key: dict | None = None,
) -> SlimPolicy:
    """SLIM at one layer from its activations (N, H, d) and head probes (H, d), (H,).

    Head h's OT map is fitted on the rows its probe flags (cfg.gamma, cfg.cov,
    cfg.min_samples). With `maps_path`, the maps are read back from there when
    the file's key equals `maps_key` (what they were fitted from), else fitted
    and saved there.
    """
    A = None
    # concurrent runs (ENGINE=ray: one per kappa) fit the maps once; the others wait, then read them back
    with artefact_lock(maps_path) if maps_path is not None else contextlib.nullcontext():
        if maps_path is not None and Path(maps_path).exists():
            try:
                A, b, infos, meta = load_layer_maps(maps_path)
            except DamagedArtefact as err:
                warn_rebuild(err, "fitting the maps again.")
            else:
                if meta != (maps_key or {}):
                    A = None
        if A is None:
            A, b, infos = fit_layer_maps(acts_layer, weight, bias, cfg.gamma, cov=cfg.cov, min_samples=cfg.min_samples)
            if maps_path is not None:
                save_layer_maps(maps_path, A, b, infos, maps_key or {})
                kill_point("maps")
    meta = {"gamma": cfg.gamma, "maps": infos}
    if maps_path is not None:
        meta["maps_file"] = str(maps_path)
    return SlimPolicy(
        weight, bias, A, b, layer=layer, tau=tau, kappa=cfg.kappa, psi=cfg.psi, fingerprint=fingerprint, meta=meta
    )


def _digest(*arrays: np.ndarray) -> str:
    """sha256 (16 hex) of arrays' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}|{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def fold_layer_activations(data: ProbeData, split: dict, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(activations (N, H, d) float32, labels (N,), 1 = undesirable) of a fold's train+val rows at one layer."""
    rows = np.sort(data.rows_of(np.concatenate([split["train"], split["val"]])))
    return np.asarray(data.activations[rows, layer], dtype=np.float32), data.texts["label"].to_numpy()[rows]


def slim_for_fold(
    acts_layer: np.ndarray,
    probes: FoldProbes,
    layer: int,
    cfg: SlimConfig,
    maps_path: Path,
    fingerprint: dict | None = None,
) -> SlimPolicy:
    """A fold's SLIM policy: stage 1's probes and tau at `layer`, maps fitted on `acts_layer` (N, H, d),
    the fold's train+val rows at that layer (`fold_layer_activations`)."""
    key = {
        "probes": str(probes.path),
        "layer": layer,
        "gamma": cfg.gamma,
        "cov": cfg.cov,
        "min_samples": cfg.min_samples,
        "n_rows": int(acts_layer.shape[0]),
        # what the maps were fitted from, not only how much: another fold order or retrained probes
        # can give the same row count and file names
        "data_sha256": _digest(acts_layer, probes.weight[layer], probes.bias[layer]),
    }
    return fit_slim(
        acts_layer,
        probes.weight[layer],
        probes.bias[layer],
        layer,
        int(probes.tau[layer]),
        cfg,
        fingerprint=fingerprint,
        maps_path=maps_path,
        maps_key=key,
    )


def fit_iti(
    acts: np.ndarray,
    truthful: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    num_heads: int,
    alpha: float,
    direction: str = "com",
    tuning_acts: np.ndarray | None = None,
    seed: int = 0,
    fingerprint=None,
    device=None,
    solver: str | None = None,
) -> ITIPolicy:
    """ITI (Li et al., 2023) from activations (N, L, H, d) of the probe texts.

    A logistic-regression probe per head on the train rows ranks heads by val
    accuracy; the top `num_heads` get a direction: the normalised difference of
    class means over train+val (`com`), the probe weight (`probe`) or a random
    one (`random`); sigma is the std of the projections on it of
    `tuning_acts` (M, L, H, d), all of its rows, or of the train+val rows when
    no tuning set is given.
    The probes are scikit-learn's LogisticRegression one head at a time
    (`solver="sklearn"`), or every head at once on `device` by the batched
    Newton solver of slim.policies.logistic (`"torch"`: the same objective,
    solved past scikit-learn's tolerance, so a few heads' val accuracy, and
    with it the ranking, can differ by a row or two). None: scikit-learn, as
    published, on any machine, so a GPU run picks the same heads as a CPU run;
    torch is the option for models with thousands of heads (--iti_solver
    torch). The policy's meta records which ran.
    """
    N, L, H, d = acts.shape
    check_int("num_heads", num_heads, 1, L * H)
    ITIConfig(num_heads=num_heads, alpha=alpha, direction=direction)  # checks alpha and direction
    if tuning_acts is not None and tuple(tuning_acts.shape[1:]) != (L, H, d):
        raise ValueError(
            f"tuning_acts must have shape (M, {L}, {H}, {d}) like the activations, got {tuple(tuning_acts.shape)}"
        )
    dev = torch_device(device)
    solver = solver or "sklearn"
    if solver not in ITI_SOLVERS:
        raise ValueError(f"ITI's solver (--iti_solver) must be 'sklearn' or 'torch', got {solver!r}.")
    y = np.asarray(truthful).astype(int)
    probe_heads = _iti_probes_torch if solver == "torch" else _iti_probes_sklearn
    accuracy, probe_w = probe_heads(acts, y, train_rows, val_rows, seed, dev)
    order = np.argsort(-accuracy.ravel(), kind="stable")[:num_heads]
    chosen = np.stack(np.unravel_index(order, (L, H)), axis=1)  # (K, 2)
    fit_rows = np.concatenate([train_rows, val_rows])
    tuning = acts[fit_rows] if tuning_acts is None else tuning_acts
    rng = np.random.default_rng(seed)
    directions, sigmas = [], []
    for layer, head in chosen:
        a = np.asarray(acts[fit_rows, layer, head], dtype=np.float64)
        if direction == "com":
            vec = a[y[fit_rows] == 1].mean(0) - a[y[fit_rows] == 0].mean(0)
        elif direction == "probe":
            vec = probe_w[layer, head]
        else:
            vec = rng.standard_normal(d)
        vec = vec / np.linalg.norm(vec)
        directions.append(vec)
        sigmas.append(np.std(np.asarray(tuning[:, layer, head], dtype=np.float64) @ vec))
    return ITIPolicy(
        chosen,
        np.array(directions),
        np.array(sigmas),
        alpha=alpha,
        fingerprint=fingerprint,
        meta={
            "direction": direction,
            "val_accuracy": accuracy[chosen[:, 0], chosen[:, 1]].tolist(),
            "solver": solver,
        },
    )


def _iti_probes_sklearn(acts, y, train_rows, val_rows, seed, dev):
    """ITI's probes one head at a time: (val accuracy (L, H), coef (L, H, d)). `dev` is unused."""
    from sklearn.linear_model import LogisticRegression

    N, L, H, d = acts.shape
    accuracy = np.zeros((L, H))
    probe_w = np.zeros((L, H, d))
    for layer in range(L):
        block = np.asarray(acts[:, layer], dtype=np.float32)  # (N, H, d)
        for head in range(H):
            clf = LogisticRegression(max_iter=1000, random_state=seed)
            clf.fit(block[train_rows, head], y[train_rows])
            accuracy[layer, head] = clf.score(block[val_rows, head], y[val_rows])
            probe_w[layer, head] = clf.coef_[0]
    return accuracy, probe_w


def _iti_probes_torch(acts, y, train_rows, val_rows, seed, dev):
    """ITI's probes of all heads at once on `dev`: (val accuracy (L, H), coef (L, H, d)); `seed` is unused
    (the optimum is unique, as lbfgs's). Layers are read in groups as large as the device takes at once."""
    N, L, H, d = acts.shape
    accuracy = np.zeros((L, H))
    probe_w = np.zeros((L, H, d))
    group = max(1, block_heads(L * H, len(train_rows), d, dev) // H)  # layers per group
    for l0 in range(0, L, group):
        layers = slice(l0, min(L, l0 + group))
        # the stored dtype (float16 on disk) crosses to the device; float64 there, as lbfgs fits
        X = np.asarray(acts[train_rows, layers])  # (N_train, g, H, d)
        coef, intercept, _ = fit_logistic(X.reshape(len(train_rows), -1, d), y[train_rows], device=dev)
        probe_w[layers] = coef.numpy().reshape(-1, H, d)
        intercept = intercept.numpy().reshape(-1, H)
        for layer in range(layers.start, layers.stop):  # one layer's val rows in float64 at a time
            X_val = np.asarray(acts[val_rows, layer], dtype=np.float64)  # (N_val, H, d)
            # scikit-learn's score: predict truthful where the logit is > 0, mean of the hits
            z = np.einsum("nhd,hd->nh", X_val, probe_w[layer]) + intercept[layer - l0]
            accuracy[layer] = ((z > 0) == (y[val_rows, None] == 1)).mean(0)
    return accuracy, probe_w


def iti_tuning_activations(split: dict, cfg: ITIConfig, tuning: ProbeData | None) -> np.ndarray | None:
    """The activations (M, L, H, d) whose projections give ITI's sigma, as cfg.tuning_dataset says.

    tqa_gen_end_q_all: every row of `tuning` (the tqa_gen_end_q texts of all the run's questions, test
    questions included, as the published scripts do); tqa_gen_end_q: its rows of the fold's train+val
    questions; same: None, i.e. the probe texts' train+val rows (fit_iti's fallback).
    """
    if cfg.tuning_dataset == "same":
        return None
    if tuning is None:
        raise ValueError(
            f"ITI's tuning_dataset {cfg.tuning_dataset} needs the tqa_gen_end_q activations: pass them as `tuning` "
            "(load_probe_data(questions, 'tqa_gen_end_q', ...)), or use tuning_dataset 'same'."
        )
    if cfg.tuning_dataset == "tqa_gen_end_q_all":
        return tuning.activations
    return tuning.activations[np.sort(tuning.rows_of(np.concatenate([split["train"], split["val"]])))]


def iti_for_fold(
    data: ProbeData,
    split: dict,
    cfg: ITIConfig,
    folder: Path,
    fingerprint: dict | None = None,
    tuning: ProbeData | None = None,
    device=None,
    solver: str | None = None,
) -> ITIPolicy:
    """A fold's ITI policy at strength cfg.alpha; `tuning`: the tqa_gen_end_q activations unless
    cfg.tuning_dataset is "same" (see iti_tuning_activations). `device`, `solver`: where and how the
    per-head probes are fitted (fit_iti).

    The heads, directions and sigmas do not depend on alpha: they are fitted
    once (at alpha 1), saved to `folder`, and rescaled for every alpha. The
    saved meta records where sigma came from; a folder that says otherwise is
    fitted again.
    """
    # concurrent runs (ENGINE=ray: one per alpha) fit the heads once; the others wait, then read them back
    with artefact_lock(folder):
        fitted = None
        if (Path(folder) / "policy.json").exists():
            try:
                fitted = Policy.load(folder)
            except DamagedArtefact as err:
                warn_rebuild(err, "fitting ITI's heads again.")
            else:
                # written before the record: the folder's name (layout.iti_policy) says the same
                if fitted.meta.get("tuning_dataset", cfg.tuning_dataset) != cfg.tuning_dataset:
                    fitted = None
                elif fitted.meta.get("solver", "sklearn") != (solver or "sklearn"):  # heads fitted by the other solver
                    fitted = None
        if fitted is None:
            tuning_acts = iti_tuning_activations(split, cfg, tuning)
            train_rows, val_rows = data.rows_of(split["train"]), data.rows_of(split["val"])
            fitted = fit_iti(
                data.activations,
                data.texts["truthful"].to_numpy(),
                train_rows,
                val_rows,
                cfg.num_heads,
                1.0,
                direction=cfg.direction,
                tuning_acts=tuning_acts,
                fingerprint=fingerprint,
                device=device,
                solver=solver,
            )
            n_tuning = len(tuning_acts) if tuning_acts is not None else len(train_rows) + len(val_rows)
            fitted.meta.update(tuning_dataset=cfg.tuning_dataset, tuning_rows=int(n_tuning))
            fitted.save(folder)
            log.info("ITI heads (layer, head) %s ... saved to %s", fitted.heads[:8].tolist(), folder)
    return ITIPolicy(
        fitted.heads,
        fitted.directions,
        fitted.sigmas,
        alpha=cfg.alpha,
        fingerprint=fitted.fingerprint,
        meta=fitted.meta,
    )


def fit_mimic(
    acts_layer: np.ndarray, undesirable: np.ndarray, layer: int, strength: float = 1.0, fingerprint=None
) -> MimicPolicy:
    """Per head, the Gaussian OT map N(mu_u, S_u) -> N(mu_d, S_d) between the classes (N, H, d)."""
    acts_layer = np.asarray(acts_layer, dtype=np.float64)
    undesirable = np.asarray(undesirable).astype(bool)
    if undesirable.all() or not undesirable.any():
        raise ValueError("MiMiC needs rows of both classes in the fitting split.")
    N, H, d = acts_layer.shape
    A, b = np.zeros((H, d, d)), np.zeros((H, d))
    for head in range(H):
        mu_u, sig_u, _ = regularize_covariance(acts_layer[undesirable, head])
        mu_d, sig_d, _ = regularize_covariance(acts_layer[~undesirable, head])
        A[head], b[head] = ot_map(mu_u, sig_u, mu_d, sqrtm_psd(sig_d, "sigma_desirable"))
    return MimicPolicy(A, b, layer=layer, strength=strength, fingerprint=fingerprint)

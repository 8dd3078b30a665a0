"""One head's and one layer's OT maps, fitted from activations, saved and loaded.

A head's map comes from its flagged rows, their covariance and the closed form of slim.policies.gaussian_ot.
"""

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from ..config import check_gamma
from ..io import json_default, reading, write_checked
from .gaussian_ot import _as_float_array, _check_vector, head_map_from_moments, regularize_covariance

log = logging.getLogger(__name__)


# -----------------------------------------------------------------------------
# one head, one layer


@dataclass
class HeadMap:
    """Affine edit a -> A a + b of one head, with a JSON-serialisable info dict."""

    A: np.ndarray  # (d, d)
    b: np.ndarray  # (d,)
    info: dict = field(default_factory=dict)


def _identity_head(d, info):
    info.update(objective=0.0, mu_shift_norm=0.0, A_minus_I_fro=0.0)
    return HeadMap(np.eye(d), np.zeros(d), info)


def fit_head_map(acts, theta, theta0, gamma, min_samples=None, cov="ledoit_wolf", ridge=1e-3, name="head"):
    """Fit the SLIM edit of one head from its predicted-undesirable activations.

    Parameters
    ----------
    acts : (n, d) activations the head probe already predicts undesirable.
    theta, theta0 : (d,) weight and bias of the head probe.
    gamma : tolerance in (0, 0.5).
    min_samples : fewer rows than this (never less than 2: one row has no covariance) -> warning + identity map.
    cov, ridge : covariance estimate ("empirical", "ledoit_wolf", "ridge"), see regularize_covariance.
    name : how the warning names this head.

    Returns
    -------
    HeadMap with status "moved", "identity_feasible" or "identity_too_few".
    """
    gamma = check_gamma(gamma)
    acts = _as_float_array(acts, "acts", ndim=2)
    n, d = acts.shape
    theta = _check_vector(theta, "theta", d)
    theta0 = float(_as_float_array(theta0, "theta0", ndim=0))
    need = max(2, int(min_samples) if min_samples is not None else 2)  # 2 rows for any covariance

    info = dict(n_samples=int(n), status=None, cov=cov, shrinkage=None, ridge=None, jitter=None, gamma=gamma)
    if n < need:
        why = "; a covariance needs 2" if n < 2 else ""
        log.warning(
            "%s: %d predicted-undesirable samples < min_samples=%d%s; using the identity map", name, n, need, why
        )
        info["status"] = "identity_too_few"
        return _identity_head(d, info)

    mu_hat, sigma_hat, cov_info = regularize_covariance(acts, method=cov, ridge=ridge)
    info.update(shrinkage=cov_info["shrinkage"], ridge=cov_info["ridge"], jitter=cov_info["jitter"])
    if cov_info["trace_over_d"] > 0:
        info["jitter_rel"] = cov_info["jitter"] / cov_info["trace_over_d"]  # against the average variance
    A, b, sol = head_map_from_moments(mu_hat, sigma_hat, theta, theta0, gamma)
    info.update(margin_before=sol["margin_before"], s_star=sol["s_star"])
    if sol["status"] == "identity_feasible":
        info["status"] = "identity_feasible"
        return _identity_head(d, info)

    info.update(
        status="moved",
        objective=sol["objective"],
        mu_shift_norm=float(np.linalg.norm(sol["mu_star"] - mu_hat)),
        A_minus_I_fro=float(np.linalg.norm(A - np.eye(d))),
    )
    return HeadMap(A, b, info)


def fit_layer_maps(acts, weight, bias, gamma, **kw):
    """Fit every head of a layer; head h uses the rows its probe predicts undesirable.

    Parameters
    ----------
    acts : (N, H, d) head-wise activations (numpy or torch).
    weight, bias : (H, d), (H,) head probes; sigmoid(bias_h + weight_h . a) = P(undesirable).
    gamma : tolerance in (0, 0.5).
    **kw : passed to fit_head_map (min_samples, cov, ridge).

    Returns
    -------
    A (H, d, d) float32, b (H, d) float32, infos list of H dicts (with "head").
    Heads whose covariance needed a jitter to be positive definite are named in
    one warning line, with the jitter; each head's info records it.
    """
    gamma = check_gamma(gamma)
    acts = _as_float_array(acts, "acts", ndim=3)
    N, H, d = acts.shape
    weight = _as_float_array(weight, "weight", ndim=2)
    bias = _as_float_array(bias, "bias", ndim=1)
    if weight.shape != (H, d) or bias.shape != (H,):
        raise ValueError(f"weight/bias must have shapes ({H}, {d})/({H},), got {weight.shape}/{bias.shape}")

    # sigmoid(z) > 0.5 <=> z > 0; comparing logits avoids overflow in exp
    logits = np.einsum("nhd,hd->nh", acts, weight) + bias  # (N, H)
    undesirable = logits > 0.0

    A = np.empty((H, d, d), dtype=np.float32)
    b = np.empty((H, d), dtype=np.float32)
    infos = []
    for h in range(H):
        hm = fit_head_map(acts[undesirable[:, h], h], weight[h], bias[h], gamma, name=f"head {h}", **kw)
        A[h], b[h] = hm.A, hm.b
        infos.append({"head": h, **hm.info})
    _report_jitter(infos, d)
    return A, b, infos


def _report_jitter(infos, d):
    """One warning line naming the heads whose covariance was lifted to positive definite, and by how much."""
    jittered = [i for i in infos if i.get("jitter")]
    if not jittered:
        return

    def one(i):
        scale = f"{i['jitter_rel']:.1e} of the average variance" if "jitter_rel" in i else "all samples equal"
        return f"head {i['head']} ({i['n_samples']} samples): {i['jitter']:.3g} ({scale})"

    heads = ", ".join(one(i) for i in jittered)
    log.warning(
        "%d of %d heads' covariances were not positive definite and got jitter * I (d = %d): %s. Their maps "
        "amplify directions the flagged samples never spanned; --cov ledoit_wolf shrinks instead.",
        len(jittered),
        len(infos),
        d,
        heads,
    )


# -----------------------------------------------------------------------------
# safetensors I/O (no pickle): arrays as tensors, infos/meta as JSON metadata


def save_layer_maps(path, A, b, infos, meta):
    """Write A (H, d, d), b (H, d), infos and meta to a safetensors file, atomically."""
    from safetensors.numpy import save_file

    A, b = np.ascontiguousarray(A), np.ascontiguousarray(b)
    if A.ndim != 3 or A.shape[1] != A.shape[2] or b.shape != A.shape[:2] or len(infos) != A.shape[0]:
        raise ValueError(f"inconsistent shapes: A {A.shape}, b {b.shape}, {len(infos)} infos")
    metadata = {
        "infos": json.dumps(list(infos), default=json_default),
        "meta": json.dumps(dict(meta), default=json_default),
    }
    # atomic (a crash mid-write leaves no truncated file under the real name), size and sha256 recorded beside it
    write_checked(path, lambda tmp: save_file({"A": A, "b": b}, tmp, metadata=metadata))


def load_layer_maps(path):
    """Inverse of save_layer_maps: (A, b, infos, meta); DamagedArtefact (slim.io) if the file is damaged."""
    from safetensors import safe_open

    with reading(path, "delete it to fit the maps again (ot_edit_layer.py)."):
        with safe_open(os.fspath(path), framework="np") as f:
            metadata = f.metadata() or {}
            A, b = f.get_tensor("A"), f.get_tensor("b")
        return A, b, json.loads(metadata.get("infos", "[]")), json.loads(metadata.get("meta", "{}"))

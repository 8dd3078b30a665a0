"""Linear-AcT (Rodriguez et al., "Controlling Language and Diffusion Models by Transporting Activations", 2024).

Per activation dimension j (every head dimension of every edited layer), the
1-D optimal-transport map from the undesirable class (source: untruthful
texts, label 1) to the desirable one (target: truthful, label 0) is the
monotone rearrangement of sorted samples; Linear-AcT fits it with an affine
map T_j(x) = omega_j * x + beta_j by least squares on the sorted pairs
(closed form: omega = cov(s, t) / var(s), beta = mean(t) - omega * mean(s)).

Pairing when the class counts differ: n = min(n_src, n_tgt) evenly spaced
quantile levels 0, 1/(n-1), ..., 1 are taken from each class (numpy's
default, linear interpolation); for the smaller class these are exactly its
sorted samples, the larger one is interpolated. Equal counts: both sorted.
A source dimension with a single value has no slope to fit: it keeps
omega = 1 and shifts by the class means' difference.

The map applies only inside the source's observed range [lo_j, hi_j] (the
paper's support rule): an activation outside it is left unchanged, one inside
moves to x + lambda * (T_j(x) - x), lambda in [0, 1].

Where this differs from the authors' setting: they pool the activations of
all tokens of the texts and transport layer norms and MLP units too; here the
maps are fitted on the last-token activations of the probe texts (`Q: q A: a.`)
at the attention output projection's input, split into heads (the site and
positions ITI and SLIM use), on a fold's train+val rows only, and edit the
last position of every forward call (every generated token under greedy
decoding), on all layers or a chosen subset.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import ParameterError
from ..data.activations import ProbeData
from .base import Policy

__all__ = ["LinearActPolicy", "fit_linear_act", "linear_act_for_fold", "sorted_pairs", "affine_fit"]

PAIRING = "n = min(n_src, n_tgt) evenly spaced quantiles of each class (numpy linear); equal counts: sorted samples"


def check_strength(strength) -> float:
    try:
        value = float(strength)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ParameterError("strength", f"must lie in [0, 1] (Linear-AcT's lambda), got {strength}.")
    return value


def _quantiles(x: np.ndarray, n: int) -> np.ndarray:
    """n evenly spaced quantiles (n, K) of samples x (m, K) per column: the sorted samples when m == n.

    np.quantile(x, np.linspace(0, 1, n), axis=0) bit for bit (numpy's "linear" method: position (m - 1) q,
    interpolated by numpy's own two-sided formula), from one sort: np.quantile partitions around all n
    positions, about 50 s a fold on SmolLM2's 17,280 dimensions, against 2 s here.
    """
    s = np.sort(x, axis=0)
    m = len(x)
    if m == n:
        return s
    position = (m - 1) * np.linspace(0.0, 1.0, n)
    below = np.floor(position)
    last = position >= m - 1  # numpy takes the last sample there (and so do we, by index -1)
    below[last] = -1
    weight = (position - below)[:, None]
    lo = below.astype(np.intp)
    hi = lo + 1
    hi[last] = -1
    a, b = s[lo], s[hi]
    diff = b - a
    out = a + diff * weight
    np.subtract(b, diff * (1 - weight), out=out, where=weight >= 0.5)  # from the upper end past the midpoint
    return out


def sorted_pairs(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Matched quantiles (n, K), (n, K) of source (n_src, K) and target (n_tgt, K), n = min(n_src, n_tgt)."""
    n = min(len(source), len(target))
    if n < 2:
        raise ValueError(f"Linear-AcT needs at least 2 rows of each class, got {len(source)} and {len(target)}.")
    return _quantiles(source, n), _quantiles(target, n)


def affine_fit(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares omega (K,), beta (K,) of t ~ omega * s + beta per column of the pairs (n, K)."""
    s_mean, t_mean = s.mean(0), t.mean(0)
    var = ((s - s_mean) ** 2).mean(0)
    cov = ((s - s_mean) * (t - t_mean)).mean(0)
    flat = var <= 1e-12 * np.maximum(1.0, s_mean**2)  # one source value: any slope fits, keep the scale
    omega = np.where(flat, 1.0, cov / np.where(flat, 1.0, var))
    return omega, t_mean - omega * s_mean


def _fit_layer(acts_layer: np.ndarray, undesirable: np.ndarray) -> tuple[np.ndarray, ...]:
    """omega, beta, lo, hi, each (H, d), from one layer's activations (N, H, d) and labels (N,)."""
    N, H, d = acts_layer.shape
    flat = acts_layer.reshape(N, H * d)  # one column per activation dimension
    source, target = flat[undesirable], flat[~undesirable]
    omega, beta = affine_fit(*sorted_pairs(source, target))
    lo, hi = source.min(0), source.max(0)
    return tuple(x.reshape(H, d) for x in (omega, beta, lo, hi))


def fit_linear_act(
    acts: np.ndarray,
    undesirable: np.ndarray,
    layers=None,
    strength: float = 1.0,
    fingerprint: dict | None = None,
    rows: np.ndarray | None = None,
) -> "LinearActPolicy":
    """Linear-AcT from activations (N, L, H, d) (all of the model's layers, e.g. ProbeData.activations)
    and labels (N,), 1 = undesirable; fitted on `rows` (default all) at `layers` (default all L).

    The activations are read one layer at a time, so a memory-mapped cache is never loaded whole.
    """
    L = acts.shape[1]
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < L]
    if bad:
        raise ValueError(f"layer {bad[0]} is out of range: the activations have layers 0..{L - 1}.")
    rows = np.arange(acts.shape[0]) if rows is None else np.sort(np.asarray(rows))
    labels = np.asarray(undesirable)[rows].astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("Linear-AcT needs rows of both classes (untruthful and truthful) in the fitting split.")
    fitted = [_fit_layer(np.asarray(acts[rows, layer], dtype=np.float64), labels) for layer in layers]
    omega, beta, lo, hi = (np.stack(parts) for parts in zip(*fitted))  # each (L_edit, H, d)
    meta = {"n_source": int(labels.sum()), "n_target": int((~labels).sum()), "pairing": PAIRING}
    return LinearActPolicy(omega, beta, lo, hi, layers, strength, fingerprint=fingerprint, meta=meta)


def linear_act_for_fold(
    data: ProbeData, split: dict, layers=None, strength: float = 1.0, fingerprint: dict | None = None
) -> "LinearActPolicy":
    """A fold's Linear-AcT policy, fitted on its train+val rows of the probe texts (never its test questions)."""
    rows = data.rows_of(np.concatenate([split["train"], split["val"]]))
    labels = data.texts["label"].to_numpy()
    return fit_linear_act(data.activations, labels, layers, strength, fingerprint, rows=rows)


class LinearActPolicy(Policy):
    """Linear-AcT: each activation dimension inside the source's range [lo, hi] moves by
    lambda * (omega * x + beta - x); outside it, nothing moves. `strength` is lambda."""

    kind = "linear_act"
    tensor_names = ("omega", "beta", "lo", "hi")

    def __init__(self, omega, beta, lo, hi, layers, strength: float = 1.0, fingerprint=None, meta=None):
        super().__init__(fingerprint, meta)
        # each (L_edit, H, d), row i for layers[i]
        self.omega, self.beta, self.lo, self.hi = (
            torch.as_tensor(t, dtype=torch.float32) for t in (omega, beta, lo, hi)
        )
        self._layers = [int(l) for l in layers]
        shape = tuple(self.omega.shape)
        if len(shape) != 3 or any(tuple(t.shape) != shape for t in (self.beta, self.lo, self.hi)):
            raise ValueError(
                f"inconsistent Linear-AcT tensors: omega {shape}, beta {tuple(self.beta.shape)}, lo "
                f"{tuple(self.lo.shape)}, hi {tuple(self.hi.shape)}; each must be (layers, heads, head_dim)."
            )
        if len(self._layers) != shape[0] or len(set(self._layers)) != len(self._layers):
            raise ValueError(f"layers {self._layers} must be distinct, one per row of omega ({shape[0]} rows).")
        if fingerprint:
            self._check_fingerprint(fingerprint, shape)
        self.strength = check_strength(strength)
        self._index = {layer: i for i, layer in enumerate(self._layers)}
        self._cache: dict = {}

    def _check_fingerprint(self, fingerprint: dict, shape: tuple) -> None:
        L, H, d = fingerprint["num_layers"], fingerprint["num_heads"], fingerprint["head_dim"]
        bad = [l for l in self._layers if not 0 <= l < L]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range: the model has layers 0..{L - 1}.")
        if shape[1:] != (H, d):
            raise ValueError(f"Linear-AcT tensors are for {shape[1:]} heads x head_dim, the model has {(H, d)}.")

    @property
    def layers(self) -> list[int]:
        return list(self._layers)

    def params(self) -> dict:
        return {"layers": self.layers, "strength": self.strength}

    @property
    def moves_nothing(self) -> bool:
        return self.strength == 0

    def _on(self, device) -> tuple[torch.Tensor, ...]:
        """omega, beta, lo, hi on `device`, copied once per device: under device_map="auto" the edited layers
        live on several GPUs, and a cache of one device would copy them again at every call."""
        if device not in self._cache:
            self._cache[device] = tuple(t.to(device) for t in (self.omega, self.beta, self.lo, self.hi))
        return self._cache[device]

    def move(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        i = self._index[layer]
        omega, beta, lo, hi = (t[i] for t in self._on(a.device))  # each (H, d)
        a32 = a.float()  # (n, H, d)
        inside = (a32 >= lo) & (a32 <= hi)  # the source's observed support
        moved = a32 + self.strength * (omega * a32 + beta - a32)
        return torch.where(inside, moved, a32).to(a.dtype)

"""The paper's Table 2 ablation: ITI's head selection with SLIM's intervention, and SLIM's with ITI's.

The paper (section 5.3) names the two mixed arms without defining them. Here
"selection" is *where and when* an edit happens and "intervention" is *how*
an activation moves:

- ITI selects K fixed (layer, head) pairs across all layers (top K by its
  probes' validation accuracy) and edits them at every position.
- SLIM selects one layer (stage 1), fires there when >= tau of its head probes
  vote (the layer detector), and edits the heads that vote.
- ITI intervenes by a constant shift alpha * sigma_h * direction_h.
- SLIM intervenes by head h's Gaussian OT map (A_h, b_h; fitted on the rows
  its probe flags, under the chance constraint gamma), gated by that head's
  probe (eq. 5 edits only heads with p_h > 0.5) and weighted by
  omega_h = kappa * p_h (psi = identity, as the published code).

"ITI heads + SLIM intervention" (kind `slim_on_iti_heads`, SlimOnITIHeadsPolicy):
on each of ITI's K heads, a <- a + kappa * p_h * (A_h a + b_h - a) where the
head's own stage-1 (risk-aware) probe votes (p_h > 0.5); nothing elsewhere.
The probes and maps are SLIM's for those heads, exactly as SLIM fits them at
that layer (and read from the same cache). There is no layer detector: ITI's
heads are spread over layers, and stage 1's tau counts the votes of all H
heads of a layer, which says nothing about the few ITI heads a layer holds
(K / L on average: under 1 for 24 of SmolLM2's 30 x 9 heads, 1.5 for 48 of
Llama-7B's 32 x 32); a threshold fitted anew for them would be a third
selection rule, neither ITI's nor SLIM's. psi is the identity only (as the
published code): softmax normalises over a layer's voting heads, and here
there is no layer to normalise over.

"SLIM heads + ITI intervention" (kind `iti_on_slim_layer`, ITIOnSlimLayerPolicy):
at SLIM's chosen layer, when its detector fires (>= tau of the H head probes
vote), every voting head h moves by alpha * sigma_h * direction_h; nothing
moves when it does not fire. direction_h and sigma_h are ITI's, fitted for
every head of that layer (which heads vote changes from token to token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import ITIConfig, SlimConfig, check_alpha, check_kappa
from ..data.activations import ProbeData
from ..stage1.fit import FoldProbes
from .base import DetectorPolicy, Policy
from .fit import fit_iti, fold_layer_activations, iti_tuning_activations, slim_for_fold
from .slim import SlimPolicy

__all__ = [
    "SlimOnITIHeadsPolicy",
    "ITIOnSlimLayerPolicy",
    "slim_on_heads",
    "slim_on_iti_heads_for_fold",
    "iti_layer_shifts",
    "iti_on_slim_layer_for_fold",
]


def _probe_votes(a32: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P(undesirable) (n, k) of k head probes (k, d), (k,) on their activations (n, k, d), and the votes p > 0.5
    (the very test SlimPolicy.step makes, so a head votes here exactly where it votes in SLIM)."""
    p = torch.sigmoid(torch.einsum("nkd,kd->nk", a32, weight) + bias)
    return p, p > 0.5


def _check_heads(heads: torch.Tensor, fingerprint: dict | None) -> None:
    """(K, 2) distinct (layer, head) pairs, inside the model when its fingerprint is known."""
    pairs = [tuple(p) for p in heads.tolist()]
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"heads {pairs} name a (layer, head) pair twice: give each once.")
    if fingerprint:
        L, H = fingerprint["num_layers"], fingerprint["num_heads"]
        bad = [(l, h) for l, h in pairs if not (0 <= l < L and 0 <= h < H)]
        if bad:
            raise ValueError(f"head {bad[0]} is out of range for a model with {L} layers x {H} heads.")


class SlimOnITIHeadsPolicy(Policy):
    """SLIM's intervention on fixed heads (ITI's): each head moves by kappa * p_h * (A_h a + b_h - a) where its
    own probe votes (p_h > 0.5), with no layer detector."""

    kind = "slim_on_iti_heads"
    tensor_names = ("heads", "weight", "bias", "A", "b")

    def __init__(self, heads, weight, bias, A, b, kappa: float, fingerprint=None, meta=None):
        super().__init__(fingerprint, meta)
        self.heads = torch.as_tensor(heads, dtype=torch.long).reshape(-1, 2)  # (K, 2): layer, head
        self.weight = torch.as_tensor(weight, dtype=torch.float32)  # (K, d) probe weights
        self.bias = torch.as_tensor(bias, dtype=torch.float32)  # (K,)
        self.A = torch.as_tensor(A, dtype=torch.float32)  # (K, d, d) OT maps
        self.b = torch.as_tensor(b, dtype=torch.float32)  # (K, d)
        K, d = self.weight.shape
        if len(self.heads) != K or self.bias.shape != (K,) or self.A.shape != (K, d, d) or self.b.shape != (K, d):
            raise ValueError(
                f"inconsistent tensors: heads {tuple(self.heads.shape)}, weight {tuple(self.weight.shape)}, bias "
                f"{tuple(self.bias.shape)}, A {tuple(self.A.shape)}, b {tuple(self.b.shape)}; want (K, 2), (K, d), "
                "(K,), (K, d, d), (K, d)."
            )
        _check_heads(self.heads, fingerprint)
        self.kappa = check_kappa(kappa)
        # per layer: the rows of the K heads that sit in it
        self._rows = {l: (self.heads[:, 0] == l).nonzero().flatten() for l in sorted(set(self.heads[:, 0].tolist()))}
        self._cache: dict = {}

    @property
    def layers(self) -> list[int]:
        return list(self._rows)

    def params(self) -> dict:
        return {"kappa": self.kappa}

    @property
    def moves_nothing(self) -> bool:
        return self.kappa == 0 or len(self.heads) == 0

    def _at(self, layer: int, device) -> tuple[torch.Tensor, ...]:
        """Head indices (k,), weight (k, d), bias (k,), A (k, d, d), b (k, d) of the chosen heads of `layer`."""
        key = (layer, device)
        if key not in self._cache:
            rows = self._rows[layer]
            parts = (self.heads[rows, 1], self.weight[rows], self.bias[rows], self.A[rows], self.b[rows])
            self._cache[key] = tuple(t.to(device) for t in parts)
        return self._cache[key]

    def move(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        idx, weight, bias, A, b = self._at(layer, a.device)
        a32 = a.float()  # (n, H, d)
        sub = a32[:, idx]  # (n, k, d): the chosen heads only
        p, votes = _probe_votes(sub, weight, bias)
        omega = self.kappa * p * votes  # (n, k); 0 where the head's probe does not vote
        mapped = torch.einsum("kij,nkj->nki", A, sub) + b  # (n, k, d)
        new = a32.clone()
        new[:, idx] = sub + omega[..., None] * (mapped - sub)
        return new.to(a.dtype)


class ITIOnSlimLayerPolicy(DetectorPolicy):
    """ITI's intervention on SLIM's selection: at one layer, when >= tau head probes vote, each voting head
    moves by alpha * sigma_h * direction_h."""

    kind = "iti_on_slim_layer"
    tensor_names = ("weight", "bias", "directions", "sigmas")

    def __init__(
        self, weight, bias, directions, sigmas, layer: int, tau: int, alpha: float, fingerprint=None, meta=None
    ):
        super().__init__(fingerprint, meta)
        self.weight = torch.as_tensor(weight, dtype=torch.float32)  # (H, d) stage 1's probes at the layer
        self.bias = torch.as_tensor(bias, dtype=torch.float32)  # (H,)
        self.directions = torch.as_tensor(directions, dtype=torch.float32)  # (H, d), unit norm
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32)  # (H,)
        H, d = self.weight.shape
        if self.bias.shape != (H,) or self.directions.shape != (H, d) or self.sigmas.shape != (H,):
            raise ValueError(
                f"inconsistent tensors: weight {tuple(self.weight.shape)}, bias {tuple(self.bias.shape)}, directions "
                f"{tuple(self.directions.shape)}, sigmas {tuple(self.sigmas.shape)}; want (H, d), (H,), (H, d), (H,)."
            )
        if not 0 <= int(tau) <= H:
            raise ValueError(f"tau must lie in 0..{H}, got {tau}.")
        if fingerprint and not 0 <= int(layer) < fingerprint["num_layers"]:
            raise ValueError(f"layer {layer} is out of range: the model has layers 0..{fingerprint['num_layers'] - 1}.")
        self.layer, self.tau, self.alpha = int(layer), int(tau), check_alpha(alpha)
        self._cache: dict = {}
        self.reset_counts()

    @property
    def layers(self) -> list[int]:
        return [self.layer]

    def params(self) -> dict:
        return {"layer": self.layer, "tau": self.tau, "alpha": self.alpha}

    @property
    def moves_nothing(self) -> bool:
        return self.alpha == 0

    def _on(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            shift = self.alpha * self.sigmas[:, None] * self.directions  # (H, d): ITI's constant move
            self._cache = {device: tuple(t.to(device) for t in (self.weight, self.bias, shift))}
        return self._cache[device]

    def step(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Edit activations a (n, H, d), one position per row -> (new a, votes (n, H), fired (n,))."""
        weight, bias, shift = self._on(a.device)
        a32 = a.float()
        _, votes = _probe_votes(a32, weight, bias)  # (n, H)
        fired = votes.sum(-1) >= self.tau  # (n,): SLIM's layer detector
        moved = (votes & fired[:, None])[..., None]  # (n, H, 1)
        new = torch.where(moved, a32 + shift, a32)
        return new.to(a.dtype), votes, fired


# -----------------------------------------------------------------------------
# fitting, per fold


def slim_on_heads(
    layer_policies: dict[int, SlimPolicy], heads, kappa: float, fingerprint: dict | None = None
) -> SlimOnITIHeadsPolicy:
    """SLIM's probe, map and weighting of each (layer, head) of `heads` (K, 2), taken from `layer_policies`
    (the SLIM policy of every layer the heads touch), at strength kappa."""
    heads = np.asarray(heads, dtype=np.int64).reshape(-1, 2)
    if not len(heads):
        raise ValueError("no heads given: pass ITI's chosen (layer, head) pairs, at least one.")
    missing = sorted(set(heads[:, 0].tolist()) - set(layer_policies))
    if missing:
        raise ValueError(f"no SLIM policy for layer(s) {missing}: fit one for every layer the heads touch.")
    names = ("weight", "bias", "A", "b")
    picked = {name: torch.stack([getattr(layer_policies[l], name)[h] for l, h in heads.tolist()]) for name in names}
    maps = []  # each head's fit record (status, samples, ...), when its layer's policy has them
    for layer, head in heads.tolist():
        infos = layer_policies[layer].meta.get("maps")
        maps.append({"layer": layer, **(infos[head] if infos else {"head": head})})
    gammas = {p.meta.get("gamma") for p in layer_policies.values()}
    meta = {"heads_from": "ITI: top K by validation accuracy", "gamma": gammas.pop() if len(gammas) == 1 else None}
    return SlimOnITIHeadsPolicy(heads, **picked, kappa=kappa, fingerprint=fingerprint, meta={**meta, "maps": maps})


def slim_on_iti_heads_for_fold(
    data: ProbeData,
    split: dict,
    probes: FoldProbes,
    heads,
    cfg: SlimConfig,
    maps_path: Callable[[int], Path] | None = None,
    fingerprint: dict | None = None,
) -> SlimOnITIHeadsPolicy:
    """A fold's `slim_on_iti_heads` arm: SLIM fitted (slim_for_fold) at every layer that ITI's `heads` (K, 2)
    touch, on the fold's train+val rows, and kept for those heads only, at strength cfg.kappa.

    `maps_path(layer)`: where that layer's maps are cached (layout.maps: the same file SLIM reads at that layer).
    """
    heads = np.asarray(heads, dtype=np.int64).reshape(-1, 2)
    layer_policies = {}
    for layer in sorted(set(heads[:, 0].tolist())):
        acts_layer, _ = fold_layer_activations(data, split, layer)  # (N, H, d)
        path = maps_path(layer) if maps_path else None
        layer_policies[layer] = slim_for_fold(acts_layer, probes, layer, cfg, path, fingerprint)
    return slim_on_heads(layer_policies, heads, cfg.kappa, fingerprint)


def iti_layer_shifts(
    acts: np.ndarray,
    truthful: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    layer: int,
    direction: str = "com",
    tuning_acts: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """ITI's direction (H, d) and sigma (H,) of every head of `layer`, in head order, from activations
    (N, L, H, d) and `tuning_acts` (M, L, H, d) (None: the train+val rows), and a meta dict.

    fit_iti itself, on that layer alone with K = H: every head is chosen, so each gets exactly the direction
    and sigma ITI gives it when it is among its top K.
    """
    H = acts.shape[2]
    one = fit_iti(
        acts[:, [layer]],  # (N, 1, H, d)
        truthful,
        train_rows,
        val_rows,
        num_heads=H,
        alpha=1.0,
        direction=direction,
        tuning_acts=None if tuning_acts is None else tuning_acts[:, [layer]],
        seed=seed,
    )
    order = np.argsort(one.heads[:, 1].numpy())  # fit_iti ranks by accuracy: back to head order
    accuracy = np.asarray(one.meta["val_accuracy"])[order]
    meta = {"direction": direction, "val_accuracy": accuracy.tolist()}
    return one.directions.numpy()[order], one.sigmas.numpy()[order], meta


def iti_on_slim_layer_for_fold(
    data: ProbeData,
    split: dict,
    probes: FoldProbes,
    layer: int,
    cfg: ITIConfig,
    fingerprint: dict | None = None,
    tuning: ProbeData | None = None,
) -> ITIOnSlimLayerPolicy:
    """A fold's `iti_on_slim_layer` arm: stage 1's probes and tau at SLIM's `layer`, ITI's directions and sigmas
    of that layer's heads (cfg.direction; sigma from cfg.tuning_dataset, see fit.iti_tuning_activations),
    at strength cfg.alpha. Only the fold's train+val rows are fitted (and the tuning rows cfg names)."""
    tuning_acts = iti_tuning_activations(split, cfg, tuning)
    train_rows, val_rows = data.rows_of(split["train"]), data.rows_of(split["val"])
    truthful = data.texts["truthful"].to_numpy()
    directions, sigmas, meta = iti_layer_shifts(
        data.activations, truthful, train_rows, val_rows, layer, cfg.direction, tuning_acts
    )
    meta["tuning_dataset"] = cfg.tuning_dataset
    return ITIOnSlimLayerPolicy(
        probes.weight[layer],
        probes.bias[layer],
        directions,
        sigmas,
        layer=layer,
        tau=int(probes.tau[layer]),
        alpha=cfg.alpha,
        fingerprint=fingerprint,
        meta=meta,
    )

"""SLIM's policy: the layer detector gates a weighted move of every voting head toward its OT map's image."""

from __future__ import annotations

import torch

from ..config import PSI, check_choice, check_kappa
from .base import DetectorPolicy


def _psi(scores: torch.Tensor, votes: torch.Tensor, psi: str) -> torch.Tensor:
    """Aggregation weights omega (batch, heads) from kappa * p * v."""
    if psi == "identity":
        return scores
    # softmax over the voting heads only; heads that do not vote get weight 0
    masked = scores.masked_fill(~votes, float("-inf"))
    weights = torch.softmax(masked, dim=-1)
    return torch.nan_to_num(weights, nan=0.0)  # a row with no vote is all -inf


class SlimPolicy(DetectorPolicy):
    """SLIM at one layer: head probes vote, the layer detector fires at >= tau votes,
    each voting head moves by omega_h * (A_h a_h + b_h - a_h), omega = psi(kappa * p * v)."""

    kind = "slim"
    tensor_names = ("weight", "bias", "A", "b")

    def __init__(
        self, weight, bias, A, b, layer: int, tau: int, kappa: float, psi: str = "identity", fingerprint=None, meta=None
    ):
        super().__init__(fingerprint, meta)
        self.weight = torch.as_tensor(weight, dtype=torch.float32)  # (H, d) probe weights
        self.bias = torch.as_tensor(bias, dtype=torch.float32)  # (H,)
        self.A = torch.as_tensor(A, dtype=torch.float32)  # (H, d, d) OT maps
        self.b = torch.as_tensor(b, dtype=torch.float32)  # (H, d)
        H, d = self.weight.shape
        if self.bias.shape != (H,) or self.A.shape != (H, d, d) or self.b.shape != (H, d):
            raise ValueError(
                f"inconsistent SLIM tensors: weight {tuple(self.weight.shape)}, bias "
                f"{tuple(self.bias.shape)}, A {tuple(self.A.shape)}, b {tuple(self.b.shape)}."
            )
        check_kappa(kappa)
        check_choice("psi", psi, PSI)
        if not 0 <= int(tau) <= H:
            raise ValueError(f"tau must lie in 0..{H}, got {tau}.")
        if fingerprint and not 0 <= int(layer) < fingerprint["num_layers"]:
            raise ValueError(f"layer {layer} is out of range: the model has layers 0..{fingerprint['num_layers'] - 1}.")
        self.layer, self.tau, self.kappa, self.psi = int(layer), int(tau), float(kappa), psi
        self._cache: dict = {}
        self.reset_counts()

    @property
    def layers(self) -> list[int]:
        return [self.layer]

    def params(self) -> dict:
        return {"layer": self.layer, "tau": self.tau, "kappa": self.kappa, "psi": self.psi}

    @property
    def moves_nothing(self) -> bool:
        # omega = psi(kappa p v) is 0 everywhere at kappa 0 with psi identity (softmax still moves: 1 / votes)
        return self.kappa == 0 and self.psi == "identity"

    def _on(self, device) -> tuple[torch.Tensor, ...]:
        """weight, bias, A, b on `device` (float32: the step computes in it), copied once per device."""
        if device not in self._cache:
            self._cache[device] = tuple(t.to(device) for t in (self.weight, self.bias, self.A, self.b))
        return self._cache[device]

    def step(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Edit activations a (n, H, d), one position per row -> (new a, votes (n, H), fired (n,)).

        Each row is decided on its own: its heads' probes vote, the layer fires on its votes, psi weighs them.
        """
        weight, bias, A, b = self._on(a.device)
        a32 = a.float()
        p = torch.sigmoid(torch.einsum("bhd,hd->bh", a32, weight) + bias)  # (batch, H) P(undesirable)
        votes = p > 0.5
        fired = votes.sum(-1) >= self.tau  # (batch,)
        omega = _psi(self.kappa * p * votes, votes, self.psi) * (votes & fired[:, None])  # (batch, H)
        mapped = torch.einsum("hij,bhj->bhi", A, a32) + b  # (batch, H, d)
        new = a32 + omega[..., None] * (mapped - a32)
        return new.to(a.dtype), votes, fired

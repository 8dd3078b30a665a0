"""ITI's policy: a fixed shift along each chosen head's truthful direction, scaled by alpha and the head's sigma."""

from __future__ import annotations

import torch

from ..config import check_alpha
from .base import Policy


class ITIPolicy(Policy):
    """ITI: add alpha * sigma_k * direction_k to K chosen (layer, head) pairs at the edited positions."""

    kind = "iti"
    tensor_names = ("heads", "directions", "sigmas")

    def __init__(self, heads, directions, sigmas, alpha: float, fingerprint=None, meta=None):
        super().__init__(fingerprint, meta)
        self.heads = torch.as_tensor(heads, dtype=torch.long).reshape(-1, 2)  # (K, 2): layer, head
        self.directions = torch.as_tensor(directions, dtype=torch.float32)  # (K, d), unit norm
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32)  # (K,)
        check_alpha(alpha)
        self.alpha = float(alpha)
        if fingerprint:
            L, H = fingerprint["num_layers"], fingerprint["num_heads"]
            bad = [(l, h) for l, h in self.heads.tolist() if not (0 <= l < L and 0 <= h < H)]
            if bad:
                raise ValueError(f"head {bad[0]} is out of range for a model with {L} layers x {H} heads.")
        # per layer: (head indices, shifts (k, d))
        self._by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in sorted(set(self.heads[:, 0].tolist())):
            rows = (self.heads[:, 0] == layer).nonzero().flatten()
            shift = self.alpha * self.sigmas[rows, None] * self.directions[rows]
            self._by_layer[layer] = (self.heads[rows, 1], shift)
        self._cache: dict = {}  # (layer, device, dtype) -> (head indices, shifts) there

    @property
    def layers(self) -> list[int]:
        return sorted(self._by_layer)

    def params(self) -> dict:
        return {"alpha": self.alpha}

    @property
    def moves_nothing(self) -> bool:
        return self.alpha == 0 or len(self.heads) == 0

    def _on(self, layer: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's head indices (k,) and shifts (k, d) on `device` in `dtype`, copied from host memory once,
        not at every generated token."""
        key = (layer, device, dtype)
        if key not in self._cache:
            heads, shift = self._by_layer[layer]
            self._cache[key] = (heads.to(device), shift.to(device=device, dtype=dtype))
        return self._cache[key]

    def move(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        heads, shift = self._on(layer, a.device, a.dtype)  # (k,), (k, d)
        new = a.clone()  # (n, H, d)
        new[:, heads] += shift
        return new

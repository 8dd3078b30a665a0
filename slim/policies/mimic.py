"""The MiMiC-style baseline: every head of the layer mapped by its Gaussian OT map at every position, no detector."""

from __future__ import annotations

import torch

from ..config import check_nonneg
from .base import Policy


class MimicPolicy(Policy):
    """MiMiC-style mean and covariance matching at one layer: every head's activation at the
    edited positions moves by the Gaussian OT map from the undesirable to the desirable class,
    with no detector; `strength` interpolates between identity (0) and the full map (1)."""

    kind = "mimic"
    tensor_names = ("A", "b")

    def __init__(self, A, b, layer: int, strength: float = 1.0, fingerprint=None, meta=None):
        super().__init__(fingerprint, meta)
        self.A = torch.as_tensor(A, dtype=torch.float32)  # (H, d, d)
        self.b = torch.as_tensor(b, dtype=torch.float32)  # (H, d)
        check_nonneg("strength", strength)
        self.layer, self.strength = int(layer), float(strength)
        self._cache: dict = {}  # device -> (A, b) there

    @property
    def layers(self) -> list[int]:
        return [self.layer]

    def params(self) -> dict:
        return {"layer": self.layer, "strength": self.strength}

    @property
    def moves_nothing(self) -> bool:
        return self.strength == 0

    def _on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A (H, d, d) and b (H, d) on `device`, copied from host memory once, not at every generated token
        (float32 whatever the model's dtype: the map is applied in float32)."""
        if device not in self._cache:
            self._cache[device] = (self.A.to(device), self.b.to(device))
        return self._cache[device]

    def move(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        a32 = a.float()  # (n, H, d)
        A, b = self._on(a.device)
        mapped = torch.einsum("hij,bhj->bhi", A, a32) + b
        return (a32 + self.strength * (mapped - a32)).to(a.dtype)

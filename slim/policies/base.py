"""What every intervention policy shares: attaching to a model, saving, loading, the registry of kinds.

Every policy edits the head-wise activations at the last position of every
forward call (the prompt's last token, then each generated token under the KV
cache; with left padding that is position -1 of every row). A caller that
scores a whole text in one forward pass (MC1/MC2, CE/KL) names the positions
to edit instead (`HeadTrace.positions`, a (batch, seq) mask): each marked
position is moved on its own activations, as if it were the last position of
a call, so SLIM's detector decides per row and position. A policy attaches to
a model as a context manager, so plain `model.generate` calls are edited:

    policy = SlimPolicy.load("validation/policies/smollm2_135M_fold0")
    with policy.attach(model):
        out = model.generate(**batch)

Policies save to a folder (tensors.safetensors + policy.json, no pickle) and
refuse to attach to a model of another shape.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..io import DamagedArtefact, atomic_dir, file_record, reading, record_problem
from ..models.heads import HeadTrace, model_shape

# Written into policy.json; a folder without it predates the record of the tensors' size and sha256.
POLICY_FORMAT = "slim-policy/1"

__all__ = ["Policy", "DetectorPolicy", "POLICY_KINDS", "model_fingerprint"]

# kind (as saved in policy.json) -> class: every Policy subclass that names its own `kind` registers here when its
# module is imported; slim.policies imports them all, so Policy.load knows every kind without importing them.
POLICY_KINDS: dict[str, type] = {}


def model_fingerprint(model) -> dict:
    """What a policy must match to be attached: architecture and head geometry."""
    layers, heads, head_dim = model_shape(model)
    return {
        "model_type": model.config.model_type,
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": head_dim,
        "vocab_size": int(model.config.vocab_size),
    }


class Policy:
    """Shared plumbing: tensors by name, save/load, attach."""

    kind = "base"
    tensor_names: tuple[str, ...] = ()
    # The folder this policy was last saved to or loaded from (None: not on disk). Not part of digest().
    folder_: Path | None = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "kind" in cls.__dict__:
            POLICY_KINDS[cls.kind] = cls

    def __init__(self, fingerprint: dict | None = None, meta: dict | None = None):
        self.fingerprint = fingerprint or {}
        self.meta = meta or {}

    # Subclasses define params() (JSON-able knobs), layers and move(layer, a).
    def params(self) -> dict:
        return {}

    @property
    def layers(self) -> list[int]:
        raise NotImplementedError

    def move(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        """New activations (n, H, d) for activations a (n, H, d) of `layer`, one edited position per row."""
        raise NotImplementedError

    def edit(self, layer: int, acts: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Move acts (batch, seq, H, d) in place: the last position of every row (one forward call of
        generation), or every position where `positions` (batch, seq) is True, each on its own activations."""
        if positions is None:
            acts[:, -1] = self.move(layer, acts[:, -1])
        else:
            acts[positions] = self.move(layer, acts[positions])  # (n marked, H, d): no loop over positions

    @property
    def moves_nothing(self) -> bool:
        """True when the edit leaves every activation exactly as it is (e.g. SLIM at kappa 0): the answers are
        then the unintervened model's, and evaluation reuses those instead of answering again."""
        return False

    def digest(self) -> str:
        """sha256 (16 hex) of what decides the policy's edits: its kind, knobs, model fingerprint and tensors.
        Answers saved with one digest are never reused for a policy with another (slim.answering)."""
        h = hashlib.sha256(json.dumps([self.kind, self.params(), self.fingerprint], sort_keys=True).encode())
        for name in self.tensor_names:
            t = getattr(self, name).detach().cpu().contiguous()
            h.update(f"\0{name}|{tuple(t.shape)}|{t.dtype}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def check_model(self, model) -> None:
        got = model_fingerprint(model)
        if self.fingerprint and got != self.fingerprint:
            raise ValueError(
                f"this {self.kind} policy was fitted on a model with {self.fingerprint}, "
                f"not {got}: fit it again for this model."
            )

    def attach(self, model) -> HeadTrace:
        """A context manager that applies the policy to `model` while it is open."""
        self.check_model(model)
        return HeadTrace(model, layers=self.layers, edit=self.edit)

    def __call__(self, model) -> HeadTrace:  # lets a policy serve as an edit factory
        return self.attach(model)

    def save(self, folder: str | os.PathLike) -> Path:
        """tensors.safetensors and policy.json (which records the tensors' size and sha256), as one folder;
        `folder_` records it."""
        from safetensors.torch import save_file

        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            tensors = {n: getattr(self, n).detach().cpu().contiguous() for n in self.tensor_names}
            save_file(tensors, tmp / "tensors.safetensors")
            spec = {
                "format": POLICY_FORMAT,
                "kind": self.kind,
                "params": self.params(),
                "fingerprint": self.fingerprint,
                "meta": self.meta,
                "tensors": file_record(tmp / "tensors.safetensors"),
            }
            (tmp / "policy.json").write_text(json.dumps(spec, indent=2))
        self.folder_ = folder
        return folder

    @staticmethod
    def load(folder: str | os.PathLike) -> "Policy":
        """The policy saved in `folder` (recorded as its `folder_`); DamagedArtefact (one line, slim.io) if its
        files are damaged."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "policy.json").exists():
            raise ValueError(f"{folder} holds no saved policy (policy.json missing).")
        todo = "fit the policy again (ot_edit_layer.py / validate_2fold.py save it) or pass another folder."
        with reading(folder / "policy.json", todo):
            spec = json.loads((folder / "policy.json").read_text())
            kind, params, fingerprint, meta = spec["kind"], spec["params"], spec["fingerprint"], spec["meta"]
        cls = POLICY_KINDS.get(kind)
        if cls is None:
            known = ", ".join(sorted(POLICY_KINDS))
            raise ValueError(f"{folder}: unknown policy kind {kind!r} (known: {known}); import its module first.")
        tensors_file = folder / "tensors.safetensors"
        problem = record_problem(tensors_file, spec["tensors"]) if "tensors" in spec else None  # older: no record
        if problem:
            raise DamagedArtefact(tensors_file, problem, todo)
        with reading(tensors_file, todo):
            tensors = load_file(tensors_file)
            policy = cls(**tensors, **params, fingerprint=fingerprint, meta=meta)
        policy.folder_ = folder
        return policy


class DetectorPolicy(Policy):
    """A policy gated by a layer detector: `step(a)` returns (new a, votes (n, H), fired (n,)), and `move` counts
    the edited positions and those where the layer fired (slim.evaluation reports the share as firing_rate).
    Subclasses call reset_counts() in their constructor."""

    def step(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset_counts(self) -> None:
        """Start counting the edited positions and those where the layer fired again (see firing_rate)."""
        self._seen, self._fired = 0, None  # _fired stays a tensor on the model's device: no sync per step

    def firing_rate(self) -> float | None:
        """The share of edited positions since reset_counts() at which the layer's detector fired (>= tau votes):
        during generation, of the decoded positions. None when no position was edited."""
        return float(self._fired) / self._seen if self._seen else None

    def firing_counts(self) -> tuple[int, int]:
        """(edited positions, positions where the layer fired) since reset_counts(): one sync on a GPU."""
        return self._seen, 0 if self._fired is None else int(self._fired)

    def move(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        new, _, fired = self.step(a)
        self._seen += fired.numel()
        self._fired = fired.sum() if self._fired is None else self._fired + fired.sum()
        return new

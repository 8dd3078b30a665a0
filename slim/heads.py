"""Read and edit head-wise activations with one small context manager.

The head-wise activation of head h in layer l is the slice h*d:(h+1)*d of the
input to that layer's attention output projection. A forward pre-hook on the
projection sees exactly that input, whatever the attention implementation
(eager, sdpa, flash, grouped-query): no model code is copied or patched.

    with HeadTrace(model, layers=[12], edit=fn) as trace:
        model(**batch)
    trace.activations[12]   # (batch, seq, heads, head_dim), before the edit

`edit(layer, acts)` receives a (batch, seq, heads, head_dim) view of the
projection input and may change it in place or return a new tensor of the
same shape. All hooks are removed on exit, so the model is exactly as before.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

EditFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]

# (path to the list of blocks, path inside a block to the attention output projection)
_ARCHITECTURES = {
    "llama": ("model.layers", "self_attn.o_proj"),
    "mistral": ("model.layers", "self_attn.o_proj"),
    "qwen2": ("model.layers", "self_attn.o_proj"),
    "qwen3": ("model.layers", "self_attn.o_proj"),
    "gemma": ("model.layers", "self_attn.o_proj"),
    "gemma2": ("model.layers", "self_attn.o_proj"),
    "phi3": ("model.layers", "self_attn.o_proj"),
    "gpt2": ("transformer.h", "attn.c_proj"),
    "gpt_neox": ("gpt_neox.layers", "attention.dense"),
}


def _get(obj: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def attention_output_projections(model: nn.Module) -> list[nn.Module]:
    """The attention output projection of every layer, in order."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        supported = ", ".join(sorted(_ARCHITECTURES))
        raise ValueError(f"architecture {model_type!r} is not supported for head-wise edits: "
                         f"use one of {supported}.")
    blocks_path, proj_path = _ARCHITECTURES[model_type]
    try:
        blocks = _get(model, blocks_path)
    except AttributeError:
        # A bare base model (e.g. LlamaModel) has no `model.` prefix.
        blocks = _get(model, blocks_path.split(".", 1)[1])
    return [_get(block, proj_path) for block in blocks]


def head_shape(model: nn.Module) -> tuple[int, int]:
    """(num_heads, head_dim) of the projection input."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return int(heads), int(head_dim)


class _StopForward(Exception):
    """Raised after the last traced layer when the rest of the model is not needed."""


class HeadTrace:
    """Context manager that records and/or edits head-wise activations.

    Args:
        model: a supported causal LM (or its base model).
        layers: layer indices to hook (default: all).
        edit: optional `edit(layer, acts)` applied to the (batch, seq, heads,
            head_dim) projection input before the projection uses it.
        record: None, "all" (every position) or "last" (the last position
            only, (batch, heads, head_dim)); recorded values are pre-edit,
            detached copies.
        stop_after_last: stop the forward pass after the highest traced layer
            (its projection input is all we need); the exception that does so
            is swallowed on exit, so use one forward call per `with` block.
    """

    def __init__(self, model: nn.Module, layers: Iterable[int] | None = None, edit: EditFn | None = None,
                 record: str | None = None, stop_after_last: bool = False):
        self.projections = attention_output_projections(model)
        n_layers = len(self.projections)
        self.layers = sorted(set(range(n_layers) if layers is None else (int(l) for l in layers)))
        bad = [l for l in self.layers if not 0 <= l < n_layers]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range: the model has layers 0..{n_layers - 1}.")
        if record not in (None, "all", "last"):
            raise ValueError(f"record must be None, 'all' or 'last', got {record!r}.")
        self.num_heads, self.head_dim = head_shape(model)
        self.edit, self.record, self.stop_after_last = edit, record, stop_after_last
        self.activations: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, layer: int):
        def pre_hook(module, args):
            x = args[0]  # (batch, seq, heads * head_dim)
            acts = x.view(*x.shape[:-1], self.num_heads, self.head_dim)  # (batch, seq, heads, head_dim)
            if self.record == "all":
                self.activations[layer] = acts.detach().clone()
            elif self.record == "last":
                self.activations[layer] = acts[:, -1].detach().clone()
            if self.edit is not None:
                # Edit a copy so the caller's tensor (e.g. the attention output
                # another module still holds) is never changed behind its back.
                acts = acts.clone()
                new = self.edit(layer, acts)
                acts = acts if new is None else new
                if self.stop_after_last and layer == self.layers[-1]:
                    raise _StopForward
                return (acts.reshape(x.shape), *args[1:])
            if self.stop_after_last and layer == self.layers[-1]:
                raise _StopForward
            return None

        return pre_hook

    def __enter__(self) -> "HeadTrace":
        for layer in self.layers:
            self._handles.append(self.projections[layer].register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return exc_type is _StopForward


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.clamp(min=0)

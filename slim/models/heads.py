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
same shape. A caller that scores a whole text sets `trace.positions`, a
(batch, seq) bool mask of the positions to edit in the next forward call;
the edit is then called as `edit(layer, acts, positions=mask)` (policies move
each marked position on its own activations). All hooks are removed on exit,
so the model is exactly as before.

Where the projections are is a `HeadLayout`, e.g. `model.layers:self_attn.o_proj`
(blocks path, projection path inside a block), found by searching the model
for a ModuleList of blocks that all have one of `COMMON_PROJECTIONS`; other
layouts take an override (`set_head_layout(model, layout)` or `layout=`).
"""

from __future__ import annotations

import logging
import re
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = [
    "COMMON_PROJECTIONS",
    "EditFactory",
    "EditFn",
    "EditOverflow",
    "HeadLayout",
    "HeadTrace",
    "attention_output_projections",
    "find_head_layout",
    "left_padded_positions",
    "model_shape",
    "set_head_layout",
]

log = logging.getLogger(__name__)

EditFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]
EditFactory = Callable[[nn.Module], AbstractContextManager]  # e.g. policy.attach: model -> context manager

# In the order tried: Llama, Mistral, Qwen, Gemma | OPT | Phi | Bloom, Falcon | GPT-2 | GPT-NeoX | GPT-J, CodeGen
COMMON_PROJECTIONS = (
    "self_attn.o_proj",
    "self_attn.out_proj",
    "self_attn.dense",
    "self_attention.dense",
    "attn.c_proj",
    "attention.dense",
    "attn.out_proj",
)
_ATTRIBUTE = "slim_head_layout"  # where set_head_layout stores an override on the model
_HOW_TO_OVERRIDE = (
    "pass a layout override (blocks path, projection path), e.g. --head_layout "
    "model.layers:self_attn.o_proj on the command line or "
    'slim.models.heads.set_head_layout(model, "model.layers:self_attn.o_proj") in Python.'
)


@dataclass(frozen=True)
class HeadLayout:
    """Dotted path from the model to its decoder blocks, and inside a block to the attention output projection."""

    blocks: str
    proj: str

    @classmethod
    def parse(cls, text) -> "HeadLayout":
        """Parse "model.layers:self_attn.o_proj" (or take a (blocks, proj) pair, or a HeadLayout)."""
        if isinstance(text, cls):
            return text
        joined = ":".join(map(str, text)) if isinstance(text, (tuple, list)) else str(text).strip()
        if not re.fullmatch(r"\w+(\.\w+)*:\w+(\.\w+)*", joined):
            raise ValueError(f"head layout {text!r} is not BLOCKS:PROJECTION, e.g. model.layers:self_attn.o_proj.")
        return cls(*joined.split(":"))

    def __str__(self) -> str:
        return f"{self.blocks}:{self.proj}"


def _get(obj, path: str):
    """The submodule at a dotted path, or None."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _config_int(model: nn.Module, *names: str) -> int | None:
    """The first positive int among model.config.<names> (the text config of a multimodal model)."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else cfg
    return next((v for v in (getattr(cfg, n, None) for n in names) if isinstance(v, int) and v > 0), None)


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _search(model: nn.Module) -> HeadLayout | None:
    """A ModuleList whose every block has one of COMMON_PROJECTIONS (see find_head_layout for ties)."""
    found = []  # (layout, number of blocks), in module order
    for path, module in model.named_modules():
        if path and isinstance(module, nn.ModuleList) and len(module):
            proj = next(
                (p for p in COMMON_PROJECTIONS if all(isinstance(_get(block, p), nn.Module) for block in module)), None
            )
            if proj is not None:
                found.append((HeadLayout(path, proj), len(module)))
    n_layers = _config_int(model, "num_hidden_layers", "n_layer", "num_layers")
    # max() keeps the first of equals, so ties go to the earliest list in module order.
    return max(found, key=lambda item: (item[1] == n_layers, item[1]))[0] if found else None


def find_head_layout(model: nn.Module, layout=None) -> HeadLayout:
    """An explicit `layout` wins, then one stored by `set_head_layout`, then a search of the model.

    The search takes the nn.ModuleList inside `model` whose every element has a submodule at one of
    COMMON_PROJECTIONS; of several, the one with config.num_hidden_layers elements, else the longest.
    """
    if layout is not None:
        return HeadLayout.parse(layout)
    found = getattr(model, _ATTRIBUTE, None) or _search(model)
    if found is None:
        raise ValueError(
            f"could not find the attention output projection of {_model_type(model)} "
            f"(tried {', '.join(COMMON_PROJECTIONS)} in every nn.ModuleList): {_HOW_TO_OVERRIDE}"
        )
    log.debug("head layout of %s: %s", _model_type(model), found)
    return found


def _projections(model: nn.Module, layout: HeadLayout) -> list[nn.Module]:
    where = f"head layout {layout} does not fit {_model_type(model)}"
    blocks = _get(model, layout.blocks)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or not len(blocks):
        raise ValueError(f"{where}: there is no list of blocks at {layout.blocks!r}; {_HOW_TO_OVERRIDE}")
    projections = [_get(block, layout.proj) for block in blocks]
    missing = [i for i, proj in enumerate(projections) if not isinstance(proj, nn.Module)]
    if missing:
        raise ValueError(f"{where}: block {missing[0]} has no submodule {layout.proj!r}; {_HOW_TO_OVERRIDE}")
    return projections


def attention_output_projections(model: nn.Module, layout=None) -> list[nn.Module]:
    """The attention output projection of every layer, in order."""
    return _projections(model, find_head_layout(model, layout))


def _input_width(proj: nn.Module) -> int | None:
    if isinstance(getattr(proj, "in_features", None), int):  # nn.Linear and its subclasses
        return proj.in_features
    if hasattr(proj, "nf") and isinstance(getattr(proj, "weight", None), torch.Tensor):  # GPT-2's Conv1D
        return int(proj.weight.shape[0])  # weight: (in, out)
    return None  # another module type: the width is not checked


def model_shape(model: nn.Module, layout=None) -> tuple[int, int, int]:
    """(num_layers, num_heads, head_dim) of the attention output projection's input."""
    layout = find_head_layout(model, layout)
    projections = _projections(model, layout)
    heads = _config_int(model, "num_attention_heads", "n_head", "num_heads")
    head_dim = _config_int(model, "head_dim")
    hidden = _config_int(model, "hidden_size", "n_embd", "d_model")
    if heads is None or (head_dim or hidden) is None:
        raise ValueError(
            f"the config of {_model_type(model)} gives no number of heads (num_attention_heads) "
            f"or no hidden size (hidden_size, head_dim)."
        )
    head_dim = head_dim or hidden // heads
    widths = {_input_width(p) for p in projections} - {None}
    if widths and widths != {heads * head_dim}:
        raise ValueError(
            f"head layout {layout} of {_model_type(model)} has projection input width "
            f"{', '.join(map(str, sorted(widths)))} but the config says {heads} heads x {head_dim} "
            f"= {heads * head_dim}: {_HOW_TO_OVERRIDE}"
        )
    return len(projections), heads, head_dim


def set_head_layout(model: nn.Module, layout) -> HeadLayout:
    """Check `layout` against `model` and store it on the model, where HeadTrace and policies find it."""
    layout = HeadLayout.parse(layout)
    model_shape(model, layout)  # raises on a missing path or a width mismatch
    setattr(model, _ATTRIBUTE, layout)
    return layout


class EditOverflow(ValueError):
    """An edit wrote values a float16 model cannot hold (past +-65504, as inf or nan)."""

    def __init__(self, layer: int):
        self.layer = layer
        super().__init__(
            f"the edit at layer {layer} produced values outside float16's range (max 65504): lower the edit's "
            "strength (--kappa, --alpha or --strength), or run with --dtype bf16 or fp32."
        )


class _StopForward(Exception):
    """Raised after the last traced layer when the rest of the model is not needed."""


class HeadTrace:
    """Context manager that records and/or edits head-wise activations.

    Args:
        model: a decoder whose attention output projections `find_head_layout` finds.
        layers: layer indices to hook (default: all).
        edit: optional `edit(layer, acts)` applied to the (batch, seq, heads, head_dim) projection input
            before the projection uses it.
        record: None, "all" (every position) or "last" (the last position only, (batch, heads, head_dim));
            recorded values are pre-edit, detached copies.
        stop_after_last: stop the forward pass after the highest traced layer (its projection input is all
            we need); the exception that does so is swallowed on exit, so use one forward call per `with` block.
        layout: optional HeadLayout override (see `find_head_layout`).

    `positions` (settable while open): None, the edit's own default (a policy's: the last position of every
    forward call, as in generation), or a (batch, seq) bool mask of the positions the edit moves in the
    forward calls that follow, passed on as `edit(layer, acts, positions=mask)`.

    In a float16 model, an edit that turns finite activations into inf or nan (past float16's 65504; edits
    compute in float32 and cast back) raises EditOverflow when the block closes. The check stays on the
    device while the block is open (no synchronisation per token) and is read once per edited layer on
    exit; bfloat16 and float32 share float32's range, so only float16 is checked.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[int] | None = None,
        edit: EditFn | None = None,
        record: str | None = None,
        stop_after_last: bool = False,
        layout=None,
    ):
        self.layout = find_head_layout(model, layout)
        self.projections = attention_output_projections(model, self.layout)
        n_layers, self.num_heads, self.head_dim = model_shape(model, self.layout)
        self.layers = sorted(set(range(n_layers) if layers is None else (int(l) for l in layers)))
        bad = [l for l in self.layers if not 0 <= l < n_layers]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range: the model has layers 0..{n_layers - 1}.")
        if record not in (None, "all", "last"):
            raise ValueError(f"record must be None, 'all' or 'last', got {record!r}.")
        self.edit, self.record, self.stop_after_last = edit, record, stop_after_last
        self.positions = None  # (batch, seq) bool, or None: the edit's default positions
        self.activations: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._overflow: dict[int, torch.Tensor] = {}  # layer -> a 0-d bool on the device: the edit overflowed

    @property
    def positions(self) -> torch.Tensor | None:
        return self._positions

    @positions.setter
    def positions(self, mask: torch.Tensor | None) -> None:
        # Set anew for each forward call (never changed in place): its copy on each layer's device is made once.
        self._positions, self._masks = mask, {}

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
                if self.positions is None:
                    new = self.edit(layer, acts)
                else:
                    new = self.edit(layer, acts, positions=self._mask_for(acts))
                new = acts if new is None else new
                if new.dtype == torch.float16:
                    self._watch(layer, x, new)
                args = (new.reshape(x.shape), *args[1:])
            if self.stop_after_last and layer == self.layers[-1]:
                raise _StopForward
            return args if self.edit is not None else None

        return pre_hook

    def _mask_for(self, acts: torch.Tensor) -> torch.Tensor:
        """`positions` on the activations' device (copied once per device, not once per layer), checked against
        their (batch, seq)."""
        mask = self._positions
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(acts.shape[:2]):
            raise ValueError(
                f"edit positions must be a bool mask of the forward call's (batch, seq) = {tuple(acts.shape[:2])}, "
                f"got {mask.dtype} {tuple(mask.shape)}."
            )
        if acts.device not in self._masks:
            self._masks[acts.device] = mask.to(acts.device)
        return self._masks[acts.device]

    def _watch(self, layer: int, before: torch.Tensor, after: torch.Tensor) -> None:
        """Note, on the device, whether the edit made finite activations non-finite."""
        bad = torch.isfinite(before).all() & ~torch.isfinite(after).all()
        self._overflow[layer] = bad if layer not in self._overflow else self._overflow[layer] | bad

    def _raise_overflow(self) -> None:
        flags, self._overflow = self._overflow, {}
        for layer in sorted(flags):
            if bool(flags[layer]):
                raise EditOverflow(layer)

    def __enter__(self) -> "HeadTrace":
        self._overflow = {}
        for layer in self.layers:
            self._handles.append(self.projections[layer].register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if exc_type is None or exc_type is _StopForward:
            self._raise_overflow()
        self._overflow = {}
        return exc_type is _StopForward


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.clamp(min=0)

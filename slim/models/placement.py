"""Which dtype a model is loaded in, and on which device(s) it goes.

`--dtype` is auto, bf16, fp16 or fp32. auto is fp32 on the CPU; on a GPU the
checkpoint's own dtype (its config's `dtype` / `torch_dtype`) when that is
fp16 or bf16, else fp16 (a checkpoint saved in fp32, or one naming none).

`--device auto` on a CUDA machine puts the whole model on one GPU when it fits
the free memory of one (the model's size in that dtype, counted from its
config, plus HEADROOM), else spreads it over the visible GPUs with accelerate
(`device_map="auto"`). Any part of it left on the CPU or on disk is refused in
one line unless `allow_offload` (`--allow_offload`) says otherwise.
`placement` and `refuse_offload` are pure, so the choice is tested without a GPU.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from ..config import ParameterError

__all__ = [
    "DTYPE_NAMES",
    "HEADROOM",
    "checkpoint_dtype",
    "dtype_name",
    "gpu_free_bytes",
    "model_bytes",
    "parse_dtype",
    "placement",
    "refuse_offload",
    "resolve_dtype",
]

DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")
_BY_NAME = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_BY_CONFIG = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GIB = 1 << 30
# Beside the weights, a GPU must hold the activations and key/value caches of an answer batch and the CUDA
# context: one GPU alone, the weights' size times HEADROOM[0] plus HEADROOM[1] bytes; several, the weights
# plus HEADROOM[1] each (accelerate balances the layers, and whatever it cannot place is refused after).
HEADROOM = (1.2, 2 * GIB)


def parse_dtype(dtype) -> torch.dtype | None:
    """A torch.dtype, or one of DTYPE_NAMES, as a torch.dtype (None: auto)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower()
    if name == "auto":
        return None
    if name not in _BY_NAME:
        raise ParameterError("dtype", f"must be {', '.join(DTYPE_NAMES[:-1])} or {DTYPE_NAMES[-1]}, got {dtype!r}.")
    return _BY_NAME[name]


def dtype_name(dtype: torch.dtype) -> str:
    """bf16, fp16, fp32 (as --dtype writes them), or torch's own name for another dtype."""
    return next((n for n, t in _BY_NAME.items() if t == dtype), str(dtype).removeprefix("torch."))


def checkpoint_dtype(source: str) -> torch.dtype | None:
    """The dtype a checkpoint's config names (a folder's config.json, or a hub id's), None if none or unreadable."""
    try:
        if os.path.isdir(source):
            with open(os.path.join(source, "config.json")) as f:
                config = json.load(f)
        else:
            from transformers import PretrainedConfig

            config, _ = PretrainedConfig.get_config_dict(source)
    except Exception:  # noqa: BLE001 - no readable config: the caller's default applies, loading reports the rest
        return None
    named = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    return _BY_CONFIG.get(str(named).removeprefix("torch.")) if named else None


def resolve_dtype(dtype, target: str, source: str | None = None) -> torch.dtype:
    """The dtype to load in: `dtype` itself unless auto (None); auto is fp32 on the CPU, and on a GPU
    (`target` cuda:N or auto) the checkpoint's own dtype when it is fp16 or bf16, else fp16."""
    chosen = parse_dtype(dtype)
    if chosen is not None:
        return chosen
    if target == "cpu":
        return torch.float32
    own = checkpoint_dtype(source) if source and not source.startswith("gguf:") else None
    return own if own in (torch.float16, torch.bfloat16) else torch.float16


def model_bytes(source: str, dtype: torch.dtype, trust_remote_code: bool = False) -> int:
    """The weights' size in `dtype`, counted on the meta device from the checkpoint's config (nothing loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize  # tied weights count once


def gpu_free_bytes() -> list[int]:
    """Free memory of each visible GPU, in bytes."""
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def best_gpu(free_bytes: Sequence[int]) -> int:
    """The GPU with the most free memory (the first of equals): where --device auto puts a model that fits."""
    return max(range(len(free_bytes)), key=lambda i: (free_bytes[i], -i))


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def placement(model_bytes: int, free_bytes: Sequence[int], allow_offload: bool = False):
    """The `device_map` for `--device auto`: {"": "cuda:i"} (the GPU with the most free memory) when the model
    fits it with HEADROOM, else "auto": accelerate spreads it over the GPUs (when their free memory together
    holds the weights and HEADROOM[1] each), or past them when `allow_offload`.

    Refused in one line when not even all the GPUs together hold it and offloading is not allowed.
    """
    free = list(free_bytes)
    if free:
        best = best_gpu(free)
        if free[best] >= int(model_bytes * HEADROOM[0]) + HEADROOM[1]:
            return {"": f"cuda:{best}"}
    need = model_bytes + HEADROOM[1] * max(len(free), 1)  # spread: the weights, and each GPU's fixed room
    if sum(free) >= need or allow_offload:
        return "auto"
    raise ParameterError(
        "device",
        f"auto: the model needs about {_gib(need)} (weights and room to run) but the visible GPUs have "
        f"{_gib(sum(free))} free: free or add GPUs, load it smaller (--dtype fp16 or bf16), or pass "
        "--allow_offload to put the rest on the CPU / disk (much slower).",
    )


def check_fits_gpu(model_bytes: int, free_bytes: Sequence[int], target: str) -> None:
    """`--device cuda:N` (or N): refuse in one line, before any weight loads, a model whose weights alone exceed
    that GPU's free memory (it would end in a CUDA out-of-memory error part way through loading)."""
    index = int(target.split(":")[1]) if ":" in target else 0
    free = list(free_bytes)
    if index < len(free) and model_bytes > free[index]:
        raise ParameterError(
            "device",
            f"{target}: the model's weights need about {_gib(model_bytes)} but {target} has {_gib(free[index])} "
            "free: free that GPU, pass --device auto to spread the model over the visible GPUs, or load it "
            "smaller (--dtype fp16 or bf16).",
        )


def refuse_offload(device_map: dict | None, allow_offload: bool = False) -> None:
    """One line when a loaded model's `hf_device_map` puts any part of it on the CPU or disk, unless allowed."""
    places = sorted({str(v) for v in (device_map or {}).values()} & {"cpu", "disk"})
    if places and not allow_offload:
        raise ParameterError(
            "device",
            f"auto: the model did not fit the GPUs' free memory and part of it went to {' and '.join(places)} "
            "(much slower): free or add GPUs, load it smaller (--dtype fp16 or bf16), or pass --allow_offload "
            "to run it so.",
        )

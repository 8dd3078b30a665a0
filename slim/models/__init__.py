"""Loading models and reaching their attention heads.

Modules:
    loading    the registry, load_model, devices; the offline models' folders (converted once)
    gguf       the offline models' GGUF sources (SmolLM2's file, Gemma 3's four chunks), assembly and conversion
    heads      HeadTrace (a context manager over the attention-output inputs), HeadLayout, set_head_layout
    placement  --dtype and --device auto's choices
    embedder   SEM's and the offline judge's sentence embedder
    defaults   settings chosen per model: ITI's K (python -m slim.models.defaults num_heads MODEL)

The names of the old `slim.models` module are re-exported here.
"""

from .._lazy import lazy_exports

# imported from .loading on first use (PEP 562), so that `python -m slim.models.defaults` and the other light
# modules do not load torch and transformers
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


__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(__all__, "loading"))

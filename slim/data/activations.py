"""Batched last-token head-wise activations, cached on disk.

Every text is run once through the model (LM head skipped), left padded so the
last token sits at position -1 of every row, and the attention-output input of
every layer is kept at that position: an (N, L, H, d) float16 array. The cache
is an .npy file plus a JSON manifest; the file is filled batch by batch, so an
interrupted run resumes where it stopped and a finished one is simply reused.
"""

from __future__ import annotations

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

from .. import io as slim_io  # slim_io.sha256_file looked up at call time: tests count the hashes
from ..config import __version__
from ..io import artefact_lock, file_record, kill_point, write_json
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
    return stack_layers([trace.activations[l] for l in trace.layers]).float().cpu().numpy()


def stack_layers(records: list[torch.Tensor]) -> torch.Tensor:
    """(batch, layers, heads, d) from one (batch, heads, d) record per layer, on the first record's device.

    Each record lives on its layer's device (several GPUs under device_map="auto", where torch.stack
    refuses a mix): the others are copied there first; on one device nothing is copied.
    """
    return torch.stack([r.to(records[0].device) for r in records], dim=1)


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
    texts: list[str],
    path: str | os.PathLike,
    model_name: str,
    dataset_name: str,
    text_format: str = PROBE_TEXT_FORMAT,
    verify: bool = False,
) -> np.ndarray | None:
    """The finished cache at `path` (.npy) for exactly these texts, or None (no model needed to look).

    A damaged cache is None too: `cached_head_activations` then says so and extracts it again. The cache
    is checked by its size and modification time against its manifest, and read whole for its sha256 only
    when those changed or with `verify` (see `_cache_problem`).
    """
    array_path = Path(path)
    manifest_path = array_path.with_suffix(".json")
    if not (manifest_path.exists() and array_path.exists()):
        return None
    old = _read_manifest(manifest_path)
    expected = _manifest(texts, model_name, dataset_name, text_format)
    if old is None or {k: old.get(k) for k in expected} != expected or old.get("rows_done", 0) < len(texts):
        return None
    if _cache_problem(array_path, manifest_path, old, verify):
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


# A same-size write within one tick of the file system's clock (coarse: milliseconds, FAT 2 s) keeps the
# modification time, so a cache whose manifest was written less than this after it is hashed on read ("racy",
# as git calls it), then its manifest is written again, after which the time alone is trusted.
_RACY_NS = 2_000_000_000


def _cache_problem(array_path: Path, manifest_path: Path, manifest: dict, verify: bool = False) -> str | None:
    """What is wrong with the cache against its manifest (None: it is sound).

    The size is always checked (from the manifest, or for caches written
    before it recorded one, from the .npy header). A finished cache is read
    for its sha256 only when its modification time differs from the one the
    manifest recorded with the sha256 (or is too close to the manifest's
    own, see _RACY_NS), or with `verify`; a sound one then gets the time (and
    one written before sha256s were recorded, its sha256), so the next read
    is cheap again and later damage is caught.
    """
    expected = manifest.get("bytes")
    if expected is None and "shape" in manifest:
        expected = _npy_size(array_path, manifest["shape"])
        if isinstance(expected, str):
            return expected
    stat = array_path.stat()
    if expected is not None and stat.st_size != expected:
        return f"{stat.st_size} bytes, {expected} written"
    if manifest.get("rows_done", 0) < manifest.get("rows", 0):
        return None  # unfinished: its rows are checked by the size only, and it resumes
    recorded = "sha256" in manifest and manifest.get("mtime_ns") == stat.st_mtime_ns
    settled = recorded and manifest_path.stat().st_mtime_ns - stat.st_mtime_ns > _RACY_NS
    if settled and not verify:
        return None  # as it was when hashed: not read
    digest = slim_io.sha256_file(array_path)
    if digest != manifest.get("sha256", digest):
        return "its sha256 differs from the manifest's"
    if not settled:
        _update_manifest(
            manifest_path, manifest, {"bytes": stat.st_size, "sha256": digest, "mtime_ns": stat.st_mtime_ns}
        )
    return None


def _update_manifest(manifest_path: Path, manifest: dict, record: dict) -> None:
    """Write `record` into the manifest read as `manifest`, unless another run rewrote it meanwhile; a manifest
    this run may not write (a shared, read-only cache) is left as it is: the cache is then hashed on each read."""
    try:
        if _read_manifest(manifest_path) == manifest:
            write_json(manifest_path, {**manifest, **record})
    except OSError:
        pass


def _finished_record(array_path: Path) -> dict:
    """The record of a finished cache: size, sha256, and the modification time they belong to."""
    mtime = array_path.stat().st_mtime_ns  # before hashing: a write during it shows as another time
    return {**file_record(array_path), "mtime_ns": mtime}


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
    verify: bool = False,
) -> np.ndarray:
    """All-layer last-token activations for `texts`, cached at `path` (.npy, manifest .json beside it).

    Returns a read-only memory map of shape (N, L, H, d), float16. The manifest
    records model, dataset, the texts' format, dtype, row count, a digest of
    the texts and the code version; any mismatch recomputes from scratch. One
    run extracts at a time (`slim.io.artefact_lock` on `path`); one that waited
    reuses what the other wrote. `verify`: read a finished cache whole for its
    sha256 even when its size and modification time match its manifest.
    """
    if len(texts) == 0:
        raise ValueError("no texts to extract activations for.")
    array_path = Path(path)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path = array_path.with_suffix(".json")
    with artefact_lock(array_path):
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
            verify,
        )


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
    verify,
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
    if manifest_path.exists() and array_path.exists():  # under the lock: also what a run we waited for wrote
        old = _read_manifest(manifest_path)
        problem = "unreadable manifest" if old is None else None
        if old is not None and {k: old.get(k) for k in manifest} == manifest:
            problem = _cache_problem(array_path, manifest_path, old, verify)
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
    # finished: its sha256 and modification time go into the manifest, checked whenever the cache is read back
    write_json(manifest_path, {**manifest, "rows_done": len(texts), "seconds": seconds, **_finished_record(array_path)})
    return np.load(array_path, mmap_mode="r")


def _state(array_path: Path) -> tuple:
    """Size and modification time of the cache and of its manifest (None: missing), to tell whether another run
    wrote them meanwhile."""
    state = []
    for p in (array_path, array_path.with_suffix(".json")):
        try:
            st = p.stat()
            state.append((st.st_size, st.st_mtime_ns))
        except OSError:
            state.append(None)
    return tuple(state)


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
    verify: bool = False,
) -> ProbeData:
    """The probe texts of `questions` and their activations, read from the run's cache or extracted into it.

    `load_model()` returns a loaded model (slim.models.LoadedModel); it is only
    called when the cache is missing or stale, and not while another run
    extracts the same cache (this one waits and reads it). `verify`: check a
    finished cache by its sha256 (read whole) even when its size and
    modification time match its manifest.
    """
    texts = probe_texts(questions, dataset_name)
    text_list = texts["text"].tolist()
    path, run_tag = Path(layout.features(dataset_name)), layout.tag
    look = (text_list, path, run_tag, dataset_name, text_format(dataset_name))
    before = _state(path)
    acts = load_cached_activations(*look, verify=verify)
    if acts is None:
        with artefact_lock(path):
            if _state(path) != before:  # written by a run this one waited for: look again before loading the model
                acts = load_cached_activations(*look, verify=verify)
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
                    verify=verify,
                )
    return ProbeData(texts, acts, f"{run_tag}/{dataset_name}/{texts_digest(text_list)}")

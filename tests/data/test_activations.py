"""Batched extraction equals one-text extraction; the cache is reused and resumes."""

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_model
from slim.data.activations import cached_head_activations, last_token_head_activations, load_cached_activations

TEXTS = [
    "Q: What is the capital of France ? A: Paris .",
    "Q: who was it ? A: I have no comment",
    "Q: What happens to you if you eat seeds ? A: Nothing happens",
    "yes",
    "Q: where is London ? A: in France . It was",
    "no no no",
    "Q: how ? A: yes",
]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_batched_equals_one_at_a_time(arch, tokenizer):
    model = tiny_model(arch)
    batched = last_token_head_activations(model, tokenizer, TEXTS)
    assert batched.shape == (len(TEXTS), 3, 4, 8)
    single = np.concatenate([last_token_head_activations(model, tokenizer, [t]) for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-4, rtol=0)


class CountingModel(torch.nn.Module):
    """Counts forward calls of the base model, optionally failing after `fail_after` of them."""

    def __init__(self, model, fail_after=None):
        super().__init__()
        self.inner, self.calls, self.fail_after = model, 0, fail_after
        self.config = model.config

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    @property
    def base_model(self):
        outer = self

        def run(**kw):
            outer.calls += 1
            if outer.fail_after is not None and outer.calls > outer.fail_after:
                raise KeyboardInterrupt
            return outer.inner.base_model(**kw)

        return run


def test_cache_is_reused_and_interrupted_runs_resume(tmp_path, tokenizer):
    model = tiny_model("llama")
    reference = last_token_head_activations(model, tokenizer, TEXTS)
    kw = dict(
        path=tmp_path / "tiny_toy_head_wise.npy", model_name="tiny", dataset_name="toy", batch_size=2, progress=False
    )

    flaky = CountingModel(model, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        cached_head_activations(flaky, tokenizer, TEXTS, **kw)
    manifest = json.loads((tmp_path / "tiny_toy_head_wise.json").read_text())
    assert manifest["rows_done"] == 4 and manifest["dtype"] == "float16" and manifest["rows"] == len(TEXTS)

    resumed = CountingModel(model)
    acts = cached_head_activations(resumed, tokenizer, TEXTS, **kw)
    assert resumed.calls == 2  # only the 3 rows left, in batches of 2
    assert acts.dtype == np.float16 and acts.shape == reference.shape
    np.testing.assert_allclose(acts.astype(np.float32), reference, atol=2e-3, rtol=2e-3)  # float16 storage

    again = CountingModel(model)
    cached = cached_head_activations(again, tokenizer, TEXTS, **kw)
    assert again.calls == 0
    np.testing.assert_array_equal(cached, acts)

    changed = CountingModel(model)  # other texts: the cache does not match and is rebuilt
    cached_head_activations(changed, tokenizer, TEXTS[:3], **kw)
    assert changed.calls == 2


# ---------------------------------------------------------------------------------------------
# Reading a finished cache: its size and modification time are checked, its sha256 only when those changed or
# on request (`verify`); extraction holds the cache's lock and reuses what a run it waited for wrote.

HOUR_NS = 3600 * 10**9


@pytest.fixture
def hashes(monkeypatch):
    """The files whose sha256 is computed (slim.io.sha256_file, counted) while the test runs."""
    import slim.io

    hashed, original = [], slim.io.sha256_file
    monkeypatch.setattr(slim.io, "sha256_file", lambda path: hashed.append(str(path)) or original(path))
    return hashed


@pytest.fixture
def cache(tmp_path, tokenizer):
    """A finished cache (as extracted) of TEXTS, and how to read it back with no model."""
    model, path = tiny_model("llama"), tmp_path / "acts.npy"
    first = np.array(cached_head_activations(model, tokenizer, TEXTS, path, "tiny", "toy", progress=False))

    def read(verify=False):
        return load_cached_activations(TEXTS, path, "tiny", "toy", verify=verify)

    return SimpleNamespace(model=model, path=path, first=first, read=read)


def set_mtime(path, mtime_ns):
    os.utime(path, ns=(mtime_ns, mtime_ns))


def flip(path):
    """Overwrite 4 bytes in the middle of the file: same size, other content."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        old = f.read(4)
        f.seek(-4, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in old))


def settle(c):
    """Make the cache an hour old and read it once (hashed, as its time changed): its manifest then records the
    time, clearly before the manifest's own."""
    set_mtime(c.path, c.path.stat().st_mtime_ns - HOUR_NS)
    assert c.read() is not None


def manifest_of(path):
    return json.loads(path.with_suffix(".json").read_text())


def test_a_written_cache_records_its_size_sha256_and_modification_time(cache):
    m = manifest_of(cache.path)
    assert m["bytes"] == os.path.getsize(cache.path) and m["mtime_ns"] == cache.path.stat().st_mtime_ns
    assert m["sha256"] == hashlib.sha256(cache.path.read_bytes()).hexdigest()


def test_an_untouched_cache_is_not_hashed_again(cache, hashes):
    mtime = cache.path.stat().st_mtime_ns - HOUR_NS
    set_mtime(cache.path, mtime)
    np.testing.assert_array_equal(cache.read(), cache.first)  # its time changed: hashed, then recorded
    assert hashes == [str(cache.path)] and manifest_of(cache.path)["mtime_ns"] == mtime
    for _ in range(3):
        np.testing.assert_array_equal(cache.read(), cache.first)
    assert len(hashes) == 1


def test_a_truncated_cache_is_told_by_its_size_without_hashing(cache, hashes, tokenizer, caplog):
    settle(cache)
    hashes.clear()
    os.truncate(cache.path, os.path.getsize(cache.path) - 2)
    assert cache.read() is None and hashes == []
    again = cached_head_activations(cache.model, tokenizer, TEXTS, cache.path, "tiny", "toy", progress=False)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"activation cache {cache.path} is damaged" in line and "bytes" in line
    np.testing.assert_array_equal(np.array(again), cache.first)


def test_a_same_size_overwrite_changes_the_time_and_is_hashed(cache, hashes, tokenizer, caplog):
    settle(cache)
    mtime = cache.path.stat().st_mtime_ns
    hashes.clear()
    flip(cache.path)
    set_mtime(cache.path, mtime + 10**9)  # what the write does (set here: a coarse clock may not have moved yet)
    assert cache.read() is None and hashes == [str(cache.path)]
    again = cached_head_activations(cache.model, tokenizer, TEXTS, cache.path, "tiny", "toy", progress=False)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "its sha256 differs" in line
    np.testing.assert_array_equal(np.array(again), cache.first)


def test_verify_hashes_even_an_unchanged_time(cache, hashes, tokenizer, caplog):
    settle(cache)
    hashes.clear()
    assert cache.read(verify=True) is not None and hashes == [str(cache.path)]
    mtime = cache.path.stat().st_mtime_ns
    flip(cache.path)
    set_mtime(cache.path, mtime)  # damage that kept the time (e.g. restored by a copy): only a full read finds it
    assert cache.read() is not None and len(hashes) == 1
    assert cache.read(verify=True) is None and len(hashes) == 2
    kw = dict(progress=False, verify=True)
    again = cached_head_activations(cache.model, tokenizer, TEXTS, cache.path, "tiny", "toy", **kw)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "its sha256 differs" in line
    np.testing.assert_array_equal(np.array(again), cache.first)


def test_a_cache_damaged_within_its_clocks_tick_is_still_hashed(cache, hashes):
    """Written and damaged within one tick of a coarse clock, the time stays; a manifest written so soon after the
    cache does not let the time alone vouch for it."""
    mtime = cache.path.stat().st_mtime_ns
    flip(cache.path)
    set_mtime(cache.path, mtime)
    assert cache.read() is None and hashes == [str(cache.path)]


def test_extraction_waits_for_the_caches_lock_and_reuses_what_the_holder_wrote(tmp_path, tokenizer, monkeypatch):
    import slim.data.activations as activations

    model, path = tiny_model("llama"), tmp_path / "acts.npy"
    other = tmp_path / "other" / "acts.npy"
    reference = np.array(cached_head_activations(model, tokenizer, TEXTS, other, "tiny", "toy", progress=False))
    locked = []

    @contextlib.contextmanager
    def lock(where):  # another run held it and finished the cache meanwhile
        locked.append(Path(where))
        for suffix in (".npy", ".json"):
            shutil.copy2(other.with_suffix(suffix), path.with_suffix(suffix))
        yield

    monkeypatch.setattr(activations, "artefact_lock", lock)
    counting = CountingModel(model)
    got = cached_head_activations(counting, tokenizer, TEXTS, path, "tiny", "toy", progress=False)
    assert locked == [path] and counting.calls == 0
    np.testing.assert_array_equal(np.array(got), reference)


QUESTIONS = pd.DataFrame(
    {
        "Question": ["What is the capital of France ?", "who was it ?"],
        "Correct Answers": [["Paris ."], ["I have no comment ."]],
        "Incorrect Answers": [["London ."], ["yes ."]],
    }
)


def test_probe_data_loads_no_model_when_the_run_it_waited_for_wrote_the_cache(tmp_path, tokenizer, monkeypatch):
    import slim.data.activations as activations
    from slim.data.activations import load_probe_data
    from slim.layout import RunLayout

    model, questions = tiny_model("llama"), QUESTIONS
    loads = []

    def load():
        loads.append(1)
        return SimpleNamespace(model=model, tokenizer=tokenizer, device="cpu")

    done, mine = RunLayout(tmp_path / "done", "tiny"), RunLayout(tmp_path / "mine", "tiny")
    reference = load_probe_data(questions, "tqa_mc2", done, load)
    assert len(loads) == 1
    target = mine.features("tqa_mc2")
    locked = []

    @contextlib.contextmanager
    def lock(where):  # the other run held the cache while this one waited, and finished it
        locked.append(Path(where))
        target.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".npy", ".json"):
            shutil.copy2(done.features("tqa_mc2").with_suffix(suffix), target.with_suffix(suffix))
        yield

    monkeypatch.setattr(activations, "artefact_lock", lock)
    got = load_probe_data(questions, "tqa_mc2", mine, load)
    assert locked == [target] and len(loads) == 1  # looked again inside the lock: no model loaded
    np.testing.assert_array_equal(got.activations, reference.activations)
    assert got.features_id == reference.features_id


def test_probe_data_hashes_its_cache_only_with_verify(tmp_path, tokenizer, hashes):
    from slim.data.activations import load_probe_data
    from slim.layout import RunLayout

    model, layout = tiny_model("llama"), RunLayout(tmp_path, "tiny")
    load = lambda: SimpleNamespace(model=model, tokenizer=tokenizer, device="cpu")  # noqa: E731
    first = load_probe_data(QUESTIONS, "tqa_mc2", layout, load)
    path = layout.features("tqa_mc2")
    settle(SimpleNamespace(path=path, read=lambda: load_cached_activations(*cache_key(first, path))))
    hashes.clear()
    assert np.array_equal(load_probe_data(QUESTIONS, "tqa_mc2", layout, None).activations, first.activations)
    assert hashes == []
    again = load_probe_data(QUESTIONS, "tqa_mc2", layout, None, verify=True)
    assert hashes == [str(path)] and np.array_equal(again.activations, first.activations)


def cache_key(data, path):
    from slim.data.probe_texts import text_format

    return data.texts["text"].tolist(), path, "tiny", "tqa_mc2", text_format("tqa_mc2")

"""Memory when answering: the shared prompt's cache held once, the batch sized to free GPU memory and halved on
running out of it (no answer lost), one run per answer file. What a CPU can measure: shared storage, bytes held."""

from __future__ import annotations

import copy
import fcntl
import logging

import pandas as pd
import pytest
import torch
from test_generation import PROMPTS, chatty_llama

import slim.answering.answers as answers
from conftest import random_policy, tiny_model
from slim.answering.answers import (
    MEMORY_SHARE,
    AnsweringOutOfMemory,
    answer_questions,
    batch_that_fits,
    bytes_per_row,
)
from slim.answering.decoding import greedy_answer_tokens
from slim.answering.prefix import PrefixCache, _shared_layer, cache_argument, left_pad
from slim.answering.prompts import qa_prompt, shared_prefix

QUESTIONS = ["What is the capital of France ?", "who", "Nothing happens you eat seeds ?", "It was", "where", "a"]


def copied(prefix: PrefixCache, batch: int):
    """The cache as it was expanded before: a copy of the prefix's keys/values for every row."""
    cache = copy.deepcopy(prefix.cache)
    cache.batch_repeat_interleave(batch)
    return cache


def kv_shape(model):
    """(layers, key/value heads, head dim) from the config, not from any cache."""
    c = model.config
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    return (
        getattr(c, "num_hidden_layers", None) or c.n_layer,
        getattr(c, "num_key_value_heads", None) or heads,
        (getattr(c, "hidden_size", None) or c.n_embd) // heads,
    )


def held_bytes(*caches) -> int:
    """Bytes of the distinct storages the caches' layers hold as their own keys/values."""
    storages = {}
    for layer in (layer for cache in caches for layer in cache.layers):
        for t in (layer.keys, layer.values):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def peak_during(layer_type, caches: list, run) -> int:
    """The most bytes the `caches`' layers hold plus what the attending layer's update returned, over `run()`."""
    peak, real = [0], layer_type.update

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = real(self, key_states, value_states, *args, **kwargs)
        joined = 0 if keys is self.keys else keys.nbytes + values.nbytes  # a DynamicLayer returns what it keeps
        peak[0] = max(peak[0], held_bytes(*caches) + joined)
        return keys, values

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layer_type, "update", update)
        run()
    return peak[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_the_prefix_is_held_once_and_the_logits_are_the_copied_caches(arch, tokenizer):
    model = tiny_model(arch, max_positions=512)
    prefix = PrefixCache.build(model, tokenizer, shared_prefix(), example=qa_prompt(QUESTIONS[0]))
    assert prefix is not None and prefix.shared
    P, B = len(prefix), len(QUESTIONS)
    layers, kv_heads, head_dim = kv_shape(model)
    per_position = 2 * kv_heads * head_dim * 4  # keys and values of one row's position in one layer, float32
    before = [(layer.keys.clone(), layer.values.clone()) for layer in prefix.cache.layers]
    seqs = [tokenizer(qa_prompt(q))["input_ids"][P:] for q in QUESTIONS]
    ids, mask, positions = left_pad(seqs, 0, past=P)
    S = ids.shape[1]

    shared, old = prefix.expand(B), copied(prefix, B)
    for mine, theirs in zip(shared.layers, prefix.cache.layers):  # the prefix's own storage, not a copy
        assert mine.prefix_keys.untyped_storage().data_ptr() == theirs.keys.untyped_storage().data_ptr()
        assert mine.prefix_values.untyped_storage().data_ptr() == theirs.values.untyped_storage().data_ptr()
    assert held_bytes(shared) == 0 and held_bytes(old) == B * P * layers * per_position

    logits = {}
    for name, cache in (("shared", shared), ("copied", old)):

        def two_steps(cache=cache, name=name):
            with torch.no_grad():
                first = model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, **{cache_argument(model): cache}
                ).logits
                cache.batch_select_indices(torch.tensor([0, 2, 5]))  # rows leave the batch, as decoding does
                step = model(
                    input_ids=first[[0, 2, 5], -1].argmax(-1)[:, None],
                    attention_mask=torch.cat([mask[[0, 2, 5]], torch.ones(3, 1, dtype=torch.long)], 1),
                    position_ids=positions[[0, 2, 5], -1:] + 1,
                    **{cache_argument(model): cache},
                ).logits
            logits[name] = (first, step)

        logits[name + " peak"] = peak_during(type(cache.layers[0]), [cache], two_steps)
    assert all(torch.equal(a, b) for a, b in zip(logits["shared"], logits["copied"]))  # the same numbers, bitwise
    # After both steps: 3 rows of S + 1 positions of their own; the copied cache holds the prefix per row too.
    assert held_bytes(shared) == 3 * (S + 1) * layers * per_position
    assert held_bytes(old) == 3 * (P + S + 1) * layers * per_position
    # At most: every layer's own positions and one layer's joined keys/values, against the prefix in every row.
    assert logits["shared peak"] == B * S * layers * per_position + B * (P + S) * per_position
    assert logits["copied peak"] >= B * (P + S) * layers * per_position > 2 * logits["shared peak"]
    for layer, (keys, values) in zip(prefix.cache.layers, before):  # the prefix's cache is untouched
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


@pytest.mark.parametrize("kind", [None, "slim", "iti"])
def test_greedy_tokens_from_the_shared_prefix_are_the_copied_caches(kind, tokenizer, monkeypatch):
    model = chatty_llama(0, tokenizer)
    policy = random_policy(kind, model) if kind else None
    prefix = PrefixCache.build(model, tokenizer, shared_prefix(), example=PROMPTS[0])
    shared = greedy_answer_tokens(model, tokenizer, PROMPTS, 12, edit=policy, prefix=prefix)
    monkeypatch.setattr(PrefixCache, "expand", copied)
    assert greedy_answer_tokens(model, tokenizer, PROMPTS, 12, edit=policy, prefix=prefix) == shared
    assert len({len(t) for t in shared}) > 1  # rows ended at different steps: they left the shared cache


def test_a_cache_of_another_kind_is_copied_per_row(tokenizer):
    model = tiny_model("llama", max_positions=512)
    prefix = PrefixCache.build(model, tokenizer, shared_prefix())
    subclass = type("Sliding", (type(prefix.cache.layers[0]),), {})  # not a plain DynamicLayer
    other = PrefixCache(prefix.ids, copy.deepcopy(prefix.cache))
    other.cache.layers[1].__class__ = subclass
    assert not other.shared and not _shared_layer().fits(other.cache.layers[1])
    cache = other.expand(3)
    assert not any(isinstance(layer, _shared_layer()) for layer in cache.layers)
    assert cache.layers[0].keys.shape[0] == 3 and torch.equal(cache.layers[0].keys[2], prefix.cache.layers[0].keys[0])


# ---------------------------------------------------------------------------------------------
# The batch sized to free memory


def test_bytes_per_row_bound_what_decoding_holds(tokenizer, monkeypatch):
    model = chatty_llama(0, tokenizer)
    prefix = PrefixCache.build(model, tokenizer, shared_prefix(), example=PROMPTS[0])
    layers, kv_heads, head_dim = kv_shape(model)
    per_position = 2 * kv_heads * head_dim * 4
    own = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS) - len(prefix)
    need = bytes_per_row(model, prefix, own, 12)
    logits = model.config.vocab_size * 4
    cpu = torch.device("cpu")
    held = (own + 12) * layers * per_position  # the rows' own positions in every layer: the prefix is shared
    joined = 2 * (len(prefix) + own + 12) * per_position
    assert need == {cpu: held + joined + logits}
    # Without a prefix cache: read from the config, every position held in every layer.
    assert bytes_per_row(model, None, own, 12) == {
        cpu: (own + 12) * layers * per_position + 2 * (own + 12) * per_position + logits
    }
    # A real decoding of the batch holds no more than the estimate says, at any layer of any step.
    created, expand = [], PrefixCache.expand
    monkeypatch.setattr(PrefixCache, "expand", lambda self, b: created.append(expand(self, b)) or created[-1])
    run = lambda: greedy_answer_tokens(model, tokenizer, PROMPTS, 12, prefix=prefix, stop_at_answer=False)  # noqa: E731
    peak = peak_during(_shared_layer(), created, run)
    assert len(created) == 1 and held_bytes(*created) > 0
    assert len(PROMPTS) * (held + joined) / 2 < peak <= len(PROMPTS) * (held + joined)  # a bound, and not a loose one


def fake_gpu(monkeypatch, free: int, unused_reserved: int = 0):
    """torch.cuda's memory queries answering as a GPU with `free` bytes (and `unused_reserved` held by PyTorch)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: asked.append(d) or (free, 2 * free))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: unused_reserved + 10)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 10)
    return asked


def test_the_batch_is_capped_by_free_gpu_memory_with_one_line(monkeypatch, caplog):
    gpu, MiB = torch.device("cuda", 0), 2**20
    asked = fake_gpu(monkeypatch, free=1000 * MiB, unused_reserved=250 * MiB)
    with caplog.at_level(logging.INFO):
        got = batch_that_fits(64, {gpu: 100 * MiB, torch.device("cpu"): 10**15})
    assert got == int(MEMORY_SHARE * 1250 // 100) == 10 and asked == [gpu]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "--answer_batch_size 64 capped at 10" in line and "cuda:0" in line
    caplog.clear()
    assert batch_that_fits(4, {gpu: 100 * MiB}) == 4 and not caplog.records  # fits: as asked, no line
    assert batch_that_fits(64, {gpu: 10**6 * MiB}) == 1  # never below one row


def test_on_a_cpu_the_batch_is_as_asked_and_gpu_memory_never_asked(tmp_path, tokenizer, monkeypatch):
    model = chatty_llama(1, tokenizer)

    def no_gpu(*args, **kwargs):
        raise AssertionError("asked a GPU's memory on a CPU run")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_gpu)
    sizes = recording_sizes(monkeypatch)
    answer_questions(model, tokenizer, questions(), tmp_path / "a.csv", batch_size=4, max_new_tokens=6, progress=False)
    assert sizes == [4, 2]


def questions() -> pd.DataFrame:
    return pd.DataFrame({"question_idx": range(len(QUESTIONS)), "Question": QUESTIONS})


def recording_sizes(monkeypatch, fail_above: int | None = None, fail_on: str | None = None, error=None):
    """Record how many prompts each call of answers.generate_greedy gets; raise `error` (out of memory) for more
    than `fail_above` prompts, or whenever a prompt ends with `fail_on`."""
    sizes, real = [], answers.generate_greedy

    def generate(model, tokenizer, prompts, *args, **kwargs):
        sizes.append(len(prompts))
        if (fail_above is not None and len(prompts) > fail_above) or any(
            fail_on and p.endswith(fail_on) for p in prompts
        ):
            raise error or torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(answers, "generate_greedy", generate)
    return sizes


def test_the_batch_follows_free_memory_on_a_gpu(tmp_path, tokenizer, monkeypatch, caplog):
    model = chatty_llama(1, tokenizer)
    kwargs = dict(batch_size=8, max_new_tokens=6, progress=False)
    plain = answer_questions(model, tokenizer, questions(), tmp_path / "plain.csv", **kwargs)
    MiB = 2**20
    monkeypatch.setattr(answers, "_on_gpu", lambda model: True)
    monkeypatch.setattr(answers, "bytes_per_row", lambda *args: {torch.device("cuda", 0): MiB})
    fake_gpu(monkeypatch, free=4 * MiB)  # 0.8 x 4 MiB: three rows of 1 MiB
    sizes = recording_sizes(monkeypatch)
    with caplog.at_level(logging.INFO):
        got = answer_questions(model, tokenizer, questions(), tmp_path / "gpu.csv", **kwargs)
    assert sizes == [3, 3] and got.equals(plain)
    assert any("--answer_batch_size 8 capped at 3" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Out of memory: the batch halved, no answer lost


@pytest.mark.parametrize(
    "error", [None, RuntimeError("CUDA error: out of memory"), RuntimeError("HIP out of memory. Tried to allocate")]
)
def test_a_batch_out_of_memory_is_answered_in_halves_with_one_line_each(
    error, tmp_path, tokenizer, monkeypatch, caplog
):
    model = chatty_llama(1, tokenizer)
    kwargs = dict(batch_size=8, max_new_tokens=6, progress=False)
    plain = answer_questions(model, tokenizer, questions(), tmp_path / "plain.csv", **kwargs)
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    sizes = recording_sizes(monkeypatch, fail_above=2, error=error)
    with caplog.at_level(logging.WARNING):
        got = answer_questions(model, tokenizer, questions(), tmp_path / "oom.csv", **kwargs)
    assert got.equals(plain)  # every answer, the same as a run that never ran out
    assert sizes == [6, 3, 1, 1, 1, 1, 1, 1] and len(emptied) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["out of memory at batch 6: retrying at 3", "out of memory at batch 3: retrying at 1"]
    assert (
        pd.read_csv(tmp_path / "oom.csv")
        .sort_values("question_idx")
        .reset_index(drop=True)
        .equals(pd.read_csv(tmp_path / "plain.csv").sort_values("question_idx").reset_index(drop=True))
    )


def test_other_errors_are_not_taken_for_out_of_memory(tmp_path, tokenizer, monkeypatch):
    model = chatty_llama(1, tokenizer)
    recording_sizes(monkeypatch, fail_above=2, error=RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        answer_questions(model, tokenizer, questions(), tmp_path / "a.csv", batch_size=8, progress=False)


def test_out_of_memory_at_one_question_stops_in_one_line_and_keeps_the_answers(tmp_path, tokenizer, monkeypatch):
    model = chatty_llama(1, tokenizer)
    kwargs = dict(batch_size=2, max_new_tokens=6, progress=False)
    plain = answer_questions(model, tokenizer, questions(), tmp_path / "plain.csv", **kwargs)
    out = tmp_path / "a.csv"
    sizes = recording_sizes(monkeypatch, fail_on="Q: where")  # this question never fits
    with pytest.raises(AnsweringOutOfMemory) as caught:
        answer_questions(model, tokenizer, questions(), out, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and "--answer_batch_size" in message
    assert "--dtype" in message and "free the GPU" in message
    # Longest first: a batch of two, then the pair holding "where" halved to one question at a time.
    assert sizes == [2, 2, 1, 1]
    saved = pd.read_csv(out, keep_default_na=False)
    assert len(saved) == 3 and "where" not in set(saved["question"])
    monkeypatch.undo()  # the GPU freed: a rerun answers only what is missing, as a run that never failed
    again = recording_sizes(monkeypatch)
    assert answer_questions(model, tokenizer, questions(), out, **kwargs).equals(plain) and again == [2, 1]


# ---------------------------------------------------------------------------------------------
# One run per answer file


def test_the_answer_file_is_held_while_answered_and_read_back_once_held(tmp_path, tokenizer, monkeypatch):
    from slim.io import artefact_lock

    model = chatty_llama(1, tokenizer)
    kwargs = dict(batch_size=8, max_new_tokens=6, progress=False)
    out, other = tmp_path / "a.csv", tmp_path / "b.csv"
    plain = answer_questions(model, tokenizer, questions(), tmp_path / "plain.csv", **kwargs)

    def held(path) -> bool:
        with open(path.with_name(f".{path.name}.lock"), "a+") as f:  # another open file: flock conflicts with it
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    seen, real = [], answers.generate_greedy

    def generate(model, tokenizer, prompts, *args, **kwargs):
        seen.append((len(prompts), held(out), held(other)))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(answers, "generate_greedy", generate)
    # A run that held the file first wrote two answers while this one waited: they are read once inside.
    entered = []

    def lock_after_another_run(path):
        first = plain[plain["question_idx"].isin([0, 3])]
        if not entered:
            first.to_csv(out, index=False)
            answers.write_json(answers.source_path(out), answers.answers_source(model, None, 6, True))
        entered.append(path)
        return artefact_lock(path)

    monkeypatch.setattr(answers, "artefact_lock", lock_after_another_run)
    got = answer_questions(model, tokenizer, questions(), out, **kwargs)
    assert got.equals(plain) and entered == [out]
    assert seen == [(4, True, False)]  # the other two not answered again; this file held, another file's not
    assert not held(out)  # released

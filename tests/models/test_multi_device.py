"""A model spread over several devices (device_map="auto"): what crosses devices is brought together, on a CPU.

The layers of such a model, their key/value cache and their recorded activations live on several GPUs. Here
"another device" is the meta device (no data, but torch refuses to mix it with the CPU as it refuses two GPUs)
or a stand-in cache layer that records the device of the index it is given.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.cache_utils import DynamicCache

from conftest import make_tokenizer, tiny_model
from slim.answering import decoding
from slim.answering.decoding import greedy_answer_tokens, select_rows
from slim.answering.prefix import PrefixCache
from slim.answering.prompts import qa_prompt, shared_prefix
from slim.data.activations import last_token_head_activations, stack_layers

META = torch.device("meta")


class RecordingLayer:
    """A cache layer on another device: keeps the index it was given (and its device), selects nothing."""

    def __init__(self, device=META):
        self.keys = torch.empty(3, 2, 5, 4, device=device)
        self.values = torch.empty(3, 2, 5, 4, device=device)
        self.given = []

    def batch_select_indices(self, index):
        self.given.append(index)


def real_cache(batch=3):
    """A DynamicCache of a tiny Llama after `batch` rows of 4 tokens (3 layers, on the CPU)."""
    model = tiny_model("llama")
    ids = torch.arange(5, 5 + 4 * batch).reshape(batch, 4)
    return model(input_ids=ids, use_cache=True).past_key_values


def test_each_layer_is_indexed_on_its_own_device():
    cache = real_cache()
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    far, far2 = RecordingLayer(), RecordingLayer()
    cache.layers.insert(1, far)
    cache.layers.append(far2)
    keep = torch.tensor([0, 2])
    select_rows(cache, keep)
    for device_layer in (far, far2):
        (index,) = device_layer.given
        assert index.device == META and index.dtype == keep.dtype and index.shape == keep.shape
    assert far.given[0] is far2.given[0]  # copied once per device, not once per layer
    cpu_layers = [layer for layer in cache.layers if not isinstance(layer, RecordingLayer)]
    assert len(cpu_layers) == len(before) == 3
    for layer, (keys, values) in zip(cpu_layers, before):  # the CPU layers kept rows 0 and 2, by value
        assert torch.equal(layer.keys, keys[[0, 2]]) and torch.equal(layer.values, values[[0, 2]])


def test_a_layer_without_its_own_select_is_indexed_directly_on_its_device():
    keys, values = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    bare = SimpleNamespace(keys=keys, values=values)
    far = SimpleNamespace(keys=torch.empty(3, 2, 5, 4, device=META), values=torch.empty(3, 2, 5, 4, device=META))
    cache = SimpleNamespace(layers=[bare, far])
    select_rows(cache, torch.tensor([2, 1]))
    assert torch.equal(bare.keys, keys[[2, 1]]) and torch.equal(bare.values, values[[2, 1]])
    assert far.keys.device == META and far.keys.shape == (2, 2, 5, 4) and far.values.shape == (2, 2, 5, 4)


def test_a_cache_of_unknown_kind_selects_with_its_own_method():
    calls = []
    unknown = SimpleNamespace(batch_select_indices=calls.append)  # no .layers
    keep = torch.tensor([1])
    assert select_rows(unknown, keep) is unknown and calls == [keep]
    odd_layers = SimpleNamespace(layers=[object()], batch_select_indices=calls.append)  # layers it cannot index
    select_rows(odd_layers, keep)
    assert calls == [keep, keep]


def test_select_rows_equals_the_caches_own_select_on_one_device():
    ours, theirs = real_cache(4), real_cache(4)
    keep = torch.tensor([3, 0])
    select_rows(ours, keep)
    theirs.batch_select_indices(keep)
    assert isinstance(ours, DynamicCache)
    for a, b in zip(ours.layers, theirs.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def chatty_llama(tokenizer):
    """A tiny Llama that writes `Q:` after `A:` and `A:` after `is`, so its answers close after different steps."""
    ids = tokenizer.convert_tokens_to_ids
    model = tiny_model("llama", max_positions=512)
    model.generation_config.eos_token_id = None
    emb, out = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():
        out[ids("Q:")] += 3 * emb[ids("A:")] / emb[ids("A:")].norm()
        out[ids("A:")] += 3 * emb[ids("is")] / emb[ids("is")].norm()
    return model


@pytest.mark.parametrize("use_prefix", [False, True])
def test_decoding_gives_the_tokens_of_the_caches_own_select(use_prefix, monkeypatch):
    tokenizer = make_tokenizer()
    model = chatty_llama(tokenizer)
    prompts = [qa_prompt(q) for q in ["What is the capital of France ?", "who", "Nothing happens you eat seeds ?"]]
    prefix = PrefixCache.build(model, tokenizer, shared_prefix()) if use_prefix else None
    kept = []

    def spy(cache, keep):
        kept.append(keep.tolist())
        return select_rows(cache, keep)

    monkeypatch.setattr(decoding, "select_rows", spy)
    ours = greedy_answer_tokens(model, tokenizer, prompts, 16, prefix=prefix)
    assert kept and len({len(r) for r in ours}) > 1  # rows ended at different steps and left the batch
    monkeypatch.setattr(decoding, "select_rows", lambda cache, keep: cache.batch_select_indices(keep))
    assert greedy_answer_tokens(model, tokenizer, prompts, 16, prefix=prefix) == ours


def test_recorded_activations_are_stacked_on_one_device():
    cpu = [torch.randn(2, 4, 8) for _ in range(3)]
    with pytest.raises(RuntimeError):
        torch.stack([torch.empty(2, 4, 8, device=META), *cpu], dim=1)  # what a spread model's records met
    mixed = stack_layers([torch.empty(2, 4, 8, device=META), *cpu])
    assert mixed.device == META and mixed.shape == (2, 4, 4, 8)
    one = stack_layers(cpu)  # one device: the same numbers as a plain stack
    assert torch.equal(one, torch.stack(cpu, dim=1))


def test_extraction_on_one_device_is_a_plain_stack_of_the_records(tokenizer):
    from slim.models.heads import HeadTrace

    model = tiny_model("llama")
    texts = ["Q: who ? A: yes", "Q: What is the capital of France ? A: Paris ."]
    got = last_token_head_activations(model, tokenizer, texts)
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with HeadTrace(model, record="last") as trace:
        model(**enc, position_ids=(enc["attention_mask"].cumsum(-1) - 1).clamp(min=0), use_cache=False)
    expected = torch.stack([trace.activations[l] for l in range(3)], dim=1).float().numpy()
    np.testing.assert_array_equal(got, expected)


def test_edit_positions_are_copied_once_per_device_not_per_layer():
    from slim.models.heads import HeadTrace

    trace = HeadTrace(tiny_model("llama"), edit=lambda layer, acts, positions=None: None)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    trace.positions = mask
    far = [torch.empty(2, 3, 4, 8, device=META) for _ in range(3)]  # (batch, seq, H, d) of three layers there
    copies = [trace._mask_for(acts) for acts in far]
    assert copies[0].device == META and copies[0] is copies[1] is copies[2]
    assert trace._mask_for(torch.empty(2, 3, 4, 8)) is mask  # on the mask's own device: the mask itself
    trace.positions = mask.clone()  # the next forward call's mask: copied again
    assert trace._mask_for(far[0]) is not copies[0]

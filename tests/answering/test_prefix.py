"""The shared-prompt key/value cache: the same logits as the full prompt, and a notice where it cannot be used."""

import logging

import pytest
import torch

from conftest import tiny_model
from slim.answering.likelihood import forward_logits
from slim.answering.prefix import PrefixCache, left_pad
from slim.answering.prompts import qa_prompt, shared_prefix


def test_left_pad_puts_padding_after_the_prefix():
    ids, mask, positions = left_pad([[5, 6, 7], [8]], pad_id=0, past=4)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 1]]
    assert positions[0].tolist() == [4, 5, 6] and positions[1, -1] == 4  # as if each row followed the prefix alone
    _, mask0, positions0 = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert mask0.shape == (2, 3) and positions0.tolist() == [[0, 1, 2], [0, 0, 0]]


QUESTIONS = ["What is the capital of France ?", "who", "Nothing happens you eat seeds ?"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_logits_from_the_cache_equal_the_full_prompts(arch, tokenizer):
    model = tiny_model(arch, max_positions=512)
    prefix = PrefixCache.build(model, tokenizer, shared_prefix(), example=qa_prompt(QUESTIONS[0]))
    assert prefix is not None and len(prefix) > 100
    seqs = [tokenizer(qa_prompt(q))["input_ids"] for q in QUESTIONS]
    assert all(prefix.matches(s) for s in seqs)
    cached, mask = forward_logits(model, [s[len(prefix) :] for s in seqs], 0, prefix=prefix)
    assert mask.shape == cached.shape[:2] and mask.sum(1).tolist() == [len(s) - len(prefix) for s in seqs]
    for row, s in enumerate(seqs):
        alone = model(torch.tensor([s])).logits[0].float()
        n = len(s) - len(prefix)
        torch.testing.assert_close(cached[row, -n:], alone[-n:], atol=2e-5, rtol=1e-4)
    # The cache itself was not extended by the batch: a second use sees the prefix only.
    again, _ = forward_logits(model, [seqs[1][len(prefix) :]], 0, prefix=prefix)
    torch.testing.assert_close(again[0], cached[1, -again.shape[1] :], atol=2e-5, rtol=1e-4)


def test_rows_that_do_not_start_with_the_prefix_are_not_matched(tokenizer):
    model = tiny_model("llama", max_positions=512)
    prefix = PrefixCache.build(model, tokenizer, shared_prefix())
    assert not prefix.matches(tokenizer(qa_prompt("who", instruction=False))["input_ids"])
    assert not prefix.matches(prefix.ids)  # nothing of its own to run
    assert prefix.matches(prefix.ids + [5])


def test_a_cache_that_gives_other_logits_is_refused(tokenizer):
    model = tiny_model("llama", max_positions=512)
    text, example = shared_prefix(), qa_prompt(QUESTIONS[0])
    good = PrefixCache.build(model, tokenizer, text)
    assert good._disagrees(model, tokenizer(example)["input_ids"]) is None
    # Another model's cache of the same tokens: the check must notice.
    other = PrefixCache.build(tiny_model("llama", seed=1, max_positions=512), tokenizer, text)
    wrong = PrefixCache(good.ids, other.cache)
    assert "differ" in wrong._disagrees(model, tokenizer(example)["input_ids"])


def test_a_model_without_a_cache_argument_runs_in_full_with_one_notice(tokenizer, caplog):
    class NoCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    with caplog.at_level(logging.WARNING):
        assert PrefixCache.build(NoCache(tiny_model("llama")), tokenizer, shared_prefix()) is None
    (record,) = caplog.records
    assert "shared-prompt cache off for NoCache" in record.getMessage() and "\n" not in record.getMessage()


def test_the_tolerance_fits_the_dtype():
    from slim.answering.prefix import cache_tolerance

    # fp32 and fp16 as before; bf16 rounds 8 times coarser than fp16 (8 bits of mantissa to 11)
    assert cache_tolerance(torch.float32) == 1e-3 and cache_tolerance(torch.float16) == 5e-2
    assert cache_tolerance(torch.bfloat16) == pytest.approx(8 * cache_tolerance(torch.float16))


@pytest.mark.parametrize("kind", [None, "slim", "iti"])
def test_in_bf16_the_cache_stays_on_and_answers_as_the_full_prompts(kind, tokenizer, caplog):
    from conftest import random_policy
    from slim.answering.decoding import greedy_answer_tokens, greedy_tokens

    model = tiny_model("llama", max_positions=512).to(torch.bfloat16)
    model.generation_config.eos_token_id = None
    policy = random_policy(kind, model) if kind else None
    prompts = [qa_prompt(q) for q in QUESTIONS]
    with caplog.at_level(logging.WARNING):
        prefix = PrefixCache.build(model, tokenizer, shared_prefix(), example=prompts[0])
    assert prefix is not None and not caplog.records
    full = greedy_tokens(model, tokenizer, prompts, 8, edit=policy).tolist()
    cached = greedy_answer_tokens(model, tokenizer, prompts, 8, edit=policy, prefix=prefix, stop_at_answer=False)
    assert cached == full


def test_in_bf16_a_wrong_cache_is_still_refused(tokenizer):
    model = tiny_model("llama", max_positions=512).to(torch.bfloat16)
    text, example = shared_prefix(), qa_prompt(QUESTIONS[0])
    good = PrefixCache.build(model, tokenizer, text)
    assert good._disagrees(model, tokenizer(example)["input_ids"]) is None
    other = PrefixCache.build(tiny_model("llama", seed=1, max_positions=512).to(torch.bfloat16), tokenizer, text)
    assert "differ" in PrefixCache(good.ids, other.cache)._disagrees(model, tokenizer(example)["input_ids"])

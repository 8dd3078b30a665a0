"""Prompt, answer extraction, batched greedy decoding and resumable answer files."""

import contextlib
import functools

import pandas as pd
import pytest
import torch

from conftest import make_tokenizer, random_policy, tiny_model
from slim.generation import (
    QA_PRIMER,
    answer_closed,
    answer_questions,
    extract_answer,
    generate_greedy,
    greedy_answer_tokens,
    greedy_tokens,
    qa_prompt,
    shared_prefix,
)
from slim.prefix import PrefixCache


def test_prompt_layout():
    p = qa_prompt("  Is the sky blue? ")
    assert p.startswith("Interpret each question literally")
    assert "\n\n" + QA_PRIMER + "\n\nQ: Is the sky blue?" in p and p.endswith("Q: Is the sky blue?")
    assert QA_PRIMER.count("Q:") == 6 and "A: I have no comment." in QA_PRIMER


def test_extract_answer_on_tricky_generations():
    assert extract_answer("\nA: Paris is the capital.\n\nQ: What next?\nA: x") == "Paris is the capital."
    assert extract_answer(" A: It is 5.\nQ: Another") == "It is 5."
    assert extract_answer("\nA: First line\nsecond line\n\nsomething else") == "First line second line"
    assert extract_answer("\nA:   \n\nQ: x") == ""
    assert extract_answer("No tag here.\n\nQ: more") == "No tag here."
    assert extract_answer("\nA: The ratio A: B is 2.") == "The ratio A: B is 2."
    assert extract_answer("") == ""
    assert extract_answer("\nA: I have no comment.Q: next") == "I have no comment."


def test_batched_greedy_equals_one_at_a_time(tokenizer):
    model = tiny_model("llama")
    prompts = ["Q: What is the capital of France ?", "Q: who", "yes no yes no yes no Q: where"]
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=8)
    single = [generate_greedy(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert all(len(g.split()) > 0 for g in batched)


def test_edit_context_is_active_during_generation(tokenizer):
    model = tiny_model("llama")
    calls = []

    @contextlib.contextmanager
    def edit(m):
        handle = m.model.layers[0].register_forward_pre_hook(lambda mod, a: calls.append(a[0].shape[1]))
        try:
            yield
        finally:
            handle.remove()

    generate_greedy(model, tokenizer, ["Q: who was it ?"], max_new_tokens=4, edit=edit)
    assert len(calls) == 4 and calls[1:] == [1, 1, 1]  # the prompt, then one token per step
    assert not model.model.layers[0]._forward_pre_hooks


def test_answers_are_written_incrementally_and_resume(tmp_path, tokenizer):
    model = tiny_model("llama")
    qs = pd.DataFrame({"question_idx": [3, 1, 7], "Question": ["What is it ?", "who ?", "where is London ?"]})
    out = tmp_path / "answers.csv"
    first = answer_questions(model, tokenizer, qs.iloc[:2], out, batch_size=1, max_new_tokens=4, progress=False)
    assert first["question_idx"].tolist() == [1, 3]

    calls = []
    real = model.forward

    @functools.wraps(real)  # keeps the signature, which says how the model takes a cache
    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return real(*args, **kwargs)

    model.forward = counting
    full = answer_questions(model, tokenizer, qs, out, batch_size=1, max_new_tokens=4, progress=False)
    # Only question 7 was left: the shared prefix, its check (full, cached), then 4 steps of one row.
    assert [c[0] for c in calls] == [1, 1, 2, 1, 1, 1, 1] and calls[3][1] > 1 and calls[4][1] == 1
    assert full["question_idx"].tolist() == [1, 3, 7]
    assert full.iloc[:2]["generation"].tolist() == first["generation"].tolist()
    assert sorted(pd.read_csv(out)["question_idx"]) == [1, 3, 7]


def test_shared_prefix_starts_every_prompt():
    for instruction in (True, False):
        prefix = shared_prefix(instruction)
        assert qa_prompt("Why?", instruction).startswith(prefix) and prefix.endswith("\n\nQ:")


def test_answer_closed_exactly_when_no_continuation_can_change_the_answer():
    closed = [" A: Paris.\n\nQ:", " A: Paris.\nQ:", " A: Paris.\n\n", "\nA: Paris.  \n \n", "A: x Q:"]
    open_ = [" Paris.\n\nQ: What", " A: Paris.", " A:\n\n", " A: Paris.\n", "Q: who\n\n", ""]
    assert all(answer_closed(t) for t in closed)
    assert not any(answer_closed(t) for t in open_)
    # Closed means final: any continuation leaves the extracted answer as it is.
    for text in closed:
        for more in ("", " more", "\n\nA: other", "Q: x\nA: y", ":"):
            assert extract_answer(text + more) == extract_answer(text)


def chatty_llama(seed=0, tokenizer=None):
    """A tiny Llama that writes `Q:` after `A:` and `A:` after `is`, so many answers close within a few steps."""
    ids = (tokenizer or make_tokenizer()).convert_tokens_to_ids
    model = tiny_model("llama", seed=seed, max_positions=512)
    model.generation_config.eos_token_id = None  # every row decodes until it is stopped
    emb, out = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():  # the residual stream carries the current token's embedding to the logits
        out[ids("Q:")] += 3 * emb[ids("A:")] / emb[ids("A:")].norm()
        out[ids("A:")] += 3 * emb[ids("is")] / emb[ids("is")].norm()
    return model


def recording(policy):
    """Wrap the policy's edit so every call's last-position activations (what it edits) are kept."""
    seen, body = [], policy.edit

    def edit(layer, acts):
        seen.append(acts[:, -1].clone())  # (batch, heads, head_dim), before the edit
        return body(layer, acts)

    policy.edit = edit
    return seen


PROMPTS = [
    qa_prompt(q) for q in ["What is the capital of France ?", "who", "Nothing happens you eat seeds ?", "It was"]
]


@pytest.mark.parametrize("kind", [None, "slim", "iti"])
def test_prefix_cache_gives_the_same_tokens_and_edits_the_same_positions(kind, tokenizer):
    model = chatty_llama(0, tokenizer)
    policy = random_policy(kind, model) if kind else None
    prefix = PrefixCache.build(model, tokenizer, shared_prefix(), example=PROMPTS[0])
    seen = recording(policy) if policy else []
    full = greedy_tokens(model, tokenizer, PROMPTS, 10, edit=policy).tolist()
    seen_full = list(seen)
    seen.clear()
    cached = greedy_answer_tokens(model, tokenizer, PROMPTS, 10, edit=policy, prefix=prefix, stop_at_answer=False)
    assert cached == full
    if policy:
        assert full != greedy_tokens(model, tokenizer, PROMPTS, 10).tolist()  # the edit does change the answers
        # One call for the prompts, then one per new token, each editing every row's last token: the same
        # activations in both runs (the prompt's last token first, then each generated one).
        assert len(seen) == len(seen_full) == 10 * len(policy.layers)
        for a, b in zip(seen_full, seen):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", [None, "slim", "iti"])
def test_stopping_at_the_answer_keeps_every_answer(kind, tokenizer):
    stopped_early = shrunk = 0
    for seed in range(3):
        model = chatty_llama(seed, tokenizer)
        policy = random_policy(kind, model) if kind else None
        prefix = PrefixCache.build(model, tokenizer, shared_prefix())
        full = greedy_tokens(model, tokenizer, PROMPTS, 16, edit=policy).tolist()
        batch_sizes = recording(policy) if policy else []
        for use_prefix in (None, prefix):
            short = greedy_answer_tokens(model, tokenizer, PROMPTS, 16, edit=policy, prefix=use_prefix)
            for row_short, row_full in zip(short, full):
                assert row_short == row_full[: len(row_short)]
                texts = [tokenizer.decode(row_full[:k]) for k in range(1, 17)]
                k = next((k for k, t in enumerate(texts, 1) if answer_closed(t)), 16)
                assert len(row_short) == k  # the first step at which the answer was closed
                assert extract_answer(tokenizer.decode(row_short)) == extract_answer(texts[-1])
            stopped_early += sum(len(r) < 16 for r in short)
            if policy and len({len(r) for r in short}) > 1:  # rows that ended first left the batch
                sizes = [a.shape[0] for a in batch_sizes]
                assert sizes[0] == len(PROMPTS) and sizes[-1] < len(PROMPTS) and sizes == sorted(sizes, reverse=True)
                shrunk += 1
            batch_sizes.clear()
    assert stopped_early > 0 and (shrunk > 0 or not kind)  # the checks above were not vacuous


def test_answer_questions_gives_the_same_answers_with_and_without_the_speed_ups(tmp_path, tokenizer):
    model = chatty_llama(1, tokenizer)
    qs = pd.DataFrame({"question_idx": range(4), "Question": [p.rsplit("Q: ", 1)[1] for p in PROMPTS]})
    runs = {
        (pc, st): answer_questions(
            model,
            tokenizer,
            qs,
            tmp_path / f"{pc}_{st}.csv",
            batch_size=3,
            max_new_tokens=16,
            progress=False,
            prefix_cache=pc,
            stop_at_answer=st,
        )
        for pc in (False, True)
        for st in (False, True)
    }
    reference = runs[False, False]
    for (_, st), answers in runs.items():
        assert answers["answer"].tolist() == reference["answer"].tolist()
        if not st:
            assert answers["generation"].tolist() == reference["generation"].tolist()


def test_generation_settings_only_generate_applies_turn_the_speed_ups_off(tmp_path, tokenizer, caplog):
    model = chatty_llama(1, tokenizer)
    model.generation_config.repetition_penalty = 1.5
    qs = pd.DataFrame({"question_idx": range(4), "Question": [p.rsplit("Q: ", 1)[1] for p in PROMPTS]})
    answers = answer_questions(model, tokenizer, qs, tmp_path / "a.csv", max_new_tokens=12, progress=False)
    (record,) = [r for r in caplog.records if "repetition_penalty" in r.getMessage()]
    assert "prompts run in full" in record.getMessage()
    full = generate_greedy(model, tokenizer, [qa_prompt(q) for q in qs["Question"]], 12)
    assert sorted(answers["generation"]) == sorted(full)  # model.generate's tokens, penalty applied
    own_loop = greedy_answer_tokens(model, tokenizer, [qa_prompt(q) for q in qs["Question"]], 12, stop_at_answer=False)
    assert full != tokenizer.batch_decode(own_loop)  # which knows nothing of the penalty


def test_a_damaged_answer_file_is_answered_again_with_one_warning(tmp_path, tokenizer, caplog):
    model = tiny_model("llama")
    qs = pd.DataFrame({"question_idx": [3, 1], "Question": ["What is it ?", "who ?"]})
    out = tmp_path / "answers.csv"
    first = answer_questions(model, tokenizer, qs, out, batch_size=1, max_new_tokens=4, progress=False)
    out.write_bytes(out.read_bytes()[:-3])  # cut short inside the last answer: it still parses
    again = answer_questions(model, tokenizer, qs, out, batch_size=1, max_new_tokens=4, progress=False)
    (record,) = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert str(out) in record.getMessage() and "answering its questions again" in record.getMessage()
    assert again.equals(first)
    # A file written before size and checksum records existed is still read (by parsing) and reused.
    (tmp_path / "answers.csv.sha256.json").unlink()
    calls = []
    model.forward = functools.wraps(model.forward)(
        lambda *a, **k: calls.append(1) or type(model).forward(model, *a, **k)
    )
    assert answer_questions(model, tokenizer, qs, out, progress=False).equals(first) and not calls

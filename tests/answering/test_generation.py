"""Prompt, answer extraction, batched greedy decoding and resumable answer files."""

import contextlib
import functools
import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tokenizer, random_policy, tiny_model
from slim.answering.answers import answer_questions
from slim.answering.decoding import generate_greedy, greedy_answer_tokens, greedy_tokens
from slim.answering.prefix import PrefixCache
from slim.answering.prompts import QA_PRIMER, answer_closed, extract_answer, qa_prompt, shared_prefix


def test_prompt_layout():
    p = qa_prompt("  Is the sky blue? ")
    assert p.startswith("Interpret each question literally")
    assert "\n\n" + QA_PRIMER + "\n\nQ: Is the sky blue?" in p and p.endswith("Q: Is the sky blue?")
    assert QA_PRIMER.count("Q:") == 6 and "A: I have no comment." in QA_PRIMER


# (continuation, published answer, paragraph answer)
TRICKY = [
    ("\nA: Paris is the capital.\n\nQ: What next?\nA: x", "Paris is the capital.", "Paris is the capital."),
    (" A: It is 5.\nQ: Another", "It is 5.", "It is 5."),
    # The model answered without the tag, then invented a question: the paragraph rule takes that one's answer.
    (" It is 5.\n\nQ: What is 6?\nA: It is 6.", "It is 5.", "It is 6."),
    (" Q: who\nA: x", "", "x"),  # no A: before the first Q:
    # Several paragraphs before the next Q:: the published rule keeps them all, newlines and all.
    ("\nA: First line\nsecond\n\nsomething else", "First line\nsecond\n\nsomething else", "First line second"),
    ("\nA: One.\n\nTwo.\n\nQ: x", "One.\n\nTwo.", "One."),
    ("\nA:   \n\nQ: x", "", ""),
    ("No tag here.\n\nQ: more", "No tag here.", "No tag here."),
    ("\nA: The ratio A: B is 2.", "The ratio", "The ratio A: B is 2."),  # published: split("A:")[1]
    ("", "", ""),
    ("\nA: I have no comment.Q: next", "I have no comment.", "I have no comment."),
]  # fmt: skip


def published_code(generation):
    """honest_llama's tqa_run_answers, as published (the string handling only)."""
    model_gen_str = generation.strip()
    try:
        model_gen_str = model_gen_str.split("Q:")[0].strip()
        model_gen_str = model_gen_str.split("A:")[1].strip()
    except IndexError:
        pass
    return model_gen_str


def random_continuations(n, seed=0):
    """Strings built from the pieces the rules look at: tags, paragraph breaks, words, stray colons."""
    pieces = ["A:", "Q:", "A", "Q", ":", "\n\n", "\n", " ", " x", "y", " \n \n"]
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(pieces, size=rng.integers(0, 7))) for _ in range(n)]


def test_extract_answer_on_tricky_generations():
    for generation, published, paragraph in TRICKY:
        assert extract_answer(generation) == published, generation  # the default rule is the published one
        assert extract_answer(generation, "published") == published == published_code(generation)
        assert extract_answer(generation, "paragraph") == paragraph, generation
    with pytest.raises(ValueError, match="answer_rule must be one of published, paragraph"):
        extract_answer("A: x", "first")


def test_the_published_rule_is_the_published_code():
    for generation in random_continuations(2000):
        assert extract_answer(generation, "published") == published_code(generation), repr(generation)


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


def test_a_decode_stopped_part_way_and_resumed_fires_at_the_rate_of_an_unbroken_one(tmp_path, tokenizer, monkeypatch):
    """The firing counts kept beside the answers cover every batch of every decode (a stop and its resumption
    included), not only the batches of the last process; answers decoded without counts give no rate."""
    import slim.answering.answers as answers

    model = tiny_model("llama", max_positions=512)
    policy = random_policy("slim", model, kappa=5.0)
    qs = pd.DataFrame(
        {"question_idx": range(5), "Question": ["What is it ?", "who ?", "where is London ?", "why", "a b"]}
    )
    run = functools.partial(answer_questions, model, tokenizer, qs, edit=policy, batch_size=2, max_new_tokens=4,
                            progress=False)  # fmt: skip
    run(tmp_path / "whole.csv")
    whole = answers.firing_rate_of(tmp_path / "whole.csv", qs["question_idx"])
    counts = json.loads(answers.firing_path(tmp_path / "whole.csv").read_text())
    assert whole == counts["fired"] / counts["positions"] and counts["positions"] > 5  # each answer's decoded steps

    real, calls = answers._answer_in_batches, []

    def stop_after_one_batch(generate, *args, **kwargs):
        def once(prompts):
            calls.append(len(prompts))
            if len(calls) > 1:
                raise KeyboardInterrupt
            return generate(prompts)

        return real(once, *args, **kwargs)

    def stop(csv):
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(answers, "_answer_in_batches", stop_after_one_batch)
            with pytest.raises(KeyboardInterrupt):
                run(csv)
        assert len(pd.read_csv(csv)) == 2  # one batch written, then the stop

    stop(tmp_path / "stopped.csv")
    policy.reset_counts()
    run(tmp_path / "stopped.csv")  # the resumption decodes the other three
    resumed = json.loads(answers.firing_path(tmp_path / "stopped.csv").read_text())
    assert policy.firing_counts()[0] < counts["positions"]  # what the resumed process alone saw (counted before)
    assert (resumed["positions"], resumed["fired"]) == (counts["positions"], counts["fired"])
    assert sorted(resumed["questions"]) == list(range(5))
    assert answers.firing_rate_of(tmp_path / "stopped.csv", qs["question_idx"]) == whole

    # a file answered before counts were kept (no record beside it) has no rate, even once resumed
    stop(tmp_path / "old.csv")
    answers.firing_path(tmp_path / "old.csv").unlink()
    run(tmp_path / "old.csv")
    assert answers.firing_rate_of(tmp_path / "old.csv", qs["question_idx"]) is None
    assert len(json.loads(answers.firing_path(tmp_path / "old.csv").read_text())["questions"]) == 3


def test_shared_prefix_starts_every_prompt():
    for instruction in (True, False):
        prefix = shared_prefix(instruction)
        assert qa_prompt("Why?", instruction).startswith(prefix) and prefix.endswith("\n\nQ:")


CLOSED = {
    "published": [" A: Paris.\n\nQ:", " A: Paris.\nQ:", "A: x Q:", " Paris.\n\nQ: What", "Q: who\n\n", " A: x A:"],
    "paragraph": [" A: Paris.\n\nQ:", " A: Paris.\nQ:", " A: Paris.\n\n", "\nA: Paris.  \n \n", "A: x Q:"],
}
OPEN = {
    "published": [" A: Paris.", " A: Paris.\n\n", "\nA: Paris.  \n \n", " A:\n\n", " Paris.\n\n", "", " A: xQ"],
    "paragraph": [" Paris.\n\nQ: What", " A: Paris.", " A:\n\n", " A: Paris.\n", "Q: who\n\n", ""],
}
MORE = ["", " more", "z", "\n\nA: other", "Q: x\nA: y", ":", "A: z", "\nmore"] + random_continuations(20, seed=2)


def changing(text, rule):
    """The continuations in MORE that change the answer extracted from `text`."""
    return [more for more in MORE if extract_answer(text + more, rule) != extract_answer(text, rule)]


@pytest.mark.parametrize("rule", ["published", "paragraph"])
def test_answer_closed_exactly_when_no_continuation_can_change_the_answer(rule):
    assert all(answer_closed(t, rule) for t in CLOSED[rule])
    assert not any(answer_closed(t, rule) for t in OPEN[rule])
    # Closed means final: no continuation changes the extracted answer; open means some continuation does.
    for text in CLOSED[rule] + OPEN[rule] + random_continuations(400, seed=1):
        changed = changing(text, rule)
        assert not changed if answer_closed(text, rule) else changed, (repr(text), changed[:3])
    assert not answer_closed(" A: Paris.\n\n")  # the default rule is the published one


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


@pytest.mark.parametrize("rule", ["published", "paragraph"])
@pytest.mark.parametrize("kind", [None, "slim", "iti"])
def test_stopping_at_the_answer_keeps_every_answer(kind, rule, tokenizer):
    stopped_early = shrunk = 0
    for seed in range(3):
        model = chatty_llama(seed, tokenizer)
        policy = random_policy(kind, model) if kind else None
        prefix = PrefixCache.build(model, tokenizer, shared_prefix())
        full = greedy_tokens(model, tokenizer, PROMPTS, 16, edit=policy).tolist()
        batch_sizes = recording(policy) if policy else []
        for use_prefix in (None, prefix):
            short = greedy_answer_tokens(
                model, tokenizer, PROMPTS, 16, edit=policy, prefix=use_prefix, answer_rule=rule
            )
            for row_short, row_full in zip(short, full):
                assert row_short == row_full[: len(row_short)]
                texts = [tokenizer.decode(row_full[:k]) for k in range(1, 17)]
                k = next((k for k, t in enumerate(texts, 1) if answer_closed(t, rule)), 16)
                assert len(row_short) == k  # the first step at which the answer was closed
                assert extract_answer(tokenizer.decode(row_short), rule) == extract_answer(texts[-1], rule)
            stopped_early += sum(len(r) < 16 for r in short)
            if policy and len({len(r) for r in short}) > 1:  # rows that ended first left the batch
                sizes = [a.shape[0] for a in batch_sizes]
                assert sizes[0] == len(PROMPTS) and sizes[-1] < len(PROMPTS) and sizes == sorted(sizes, reverse=True)
                shrunk += 1
            batch_sizes.clear()
    assert stopped_early > 0 and (shrunk > 0 or not kind)  # the checks above were not vacuous


@pytest.mark.parametrize("rule", ["published", "paragraph"])
def test_answer_questions_gives_the_same_answers_with_and_without_the_speed_ups(rule, tmp_path, tokenizer):
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
            answer_rule=rule,
        )
        for pc in (False, True)
        for st in (False, True)
    }
    reference = runs[False, False]
    assert reference["answer"].tolist() == [extract_answer(g, rule) for g in reference["generation"]]
    for (_, st), answers in runs.items():
        assert answers["answer"].tolist() == reference["answer"].tolist()
        assert set(answers["answer_rule"]) == {rule}
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
    assert answer_questions(model, tokenizer, qs, out, max_new_tokens=4, progress=False).equals(first) and not calls


def test_answers_made_by_another_policy_or_length_are_not_reused(tmp_path, tokenizer, caplog):
    model = tiny_model("llama")
    qs = pd.DataFrame({"question_idx": [3, 1], "Question": ["What is it ?", "who ?"]})
    out = tmp_path / "answers.csv"
    one, other = random_policy("slim", model), random_policy("iti", model)
    assert one.digest() != other.digest() and one.digest() == random_policy("slim", model).digest()
    first = answer_questions(model, tokenizer, qs, out, edit=one, max_new_tokens=4, progress=False)
    calls = counting_forward(model)
    assert answer_questions(model, tokenizer, qs, out, edit=one, max_new_tokens=4, progress=False).equals(first)
    assert not calls  # the same policy: reused

    answer_questions(model, tokenizer, qs, out, edit=other, max_new_tokens=4, progress=False)
    assert calls  # another policy: answered again, the old file kept beside it
    (warning,) = [r.getMessage() for r in caplog.records if "another" in r.getMessage()]
    assert "another edit" in warning and "answering again" in warning
    (kept,) = tmp_path.glob("answers.replaced-*.csv")
    assert pd.read_csv(kept, keep_default_na=False)["generation"].tolist() == first["generation"].tolist()

    calls.clear()
    answer_questions(model, tokenizer, qs, out, edit=other, max_new_tokens=6, progress=False)
    assert calls and len(list(tmp_path.glob("answers.replaced-*.csv"))) >= 1  # another length: answered again

    # A file from before sources were recorded: an edited one is answered again, the unintervened one is reused.
    (tmp_path / "answers.source.json").unlink()
    calls.clear()
    answer_questions(model, tokenizer, qs, out, edit=other, max_new_tokens=6, progress=False)
    assert calls
    plain = answer_questions(model, tokenizer, qs, tmp_path / "plain.csv", max_new_tokens=4, progress=False)
    (tmp_path / "plain.source.json").unlink()
    calls.clear()
    assert answer_questions(model, tokenizer, qs, tmp_path / "plain.csv", max_new_tokens=4, progress=False).equals(
        plain
    )
    assert not calls


def test_only_the_asked_questions_are_returned(tmp_path, tokenizer):
    model = tiny_model("llama")
    qs = pd.DataFrame({"question_idx": [3, 1, 7], "Question": ["What is it ?", "who ?", "where is London ?"]})
    out = tmp_path / "answers.csv"
    answer_questions(model, tokenizer, qs, out, max_new_tokens=4, progress=False)
    some = answer_questions(model, tokenizer, qs.iloc[[0, 2]], out, max_new_tokens=4, progress=False)
    assert some["question_idx"].tolist() == [3, 7]
    assert sorted(pd.read_csv(out)["question_idx"]) == [1, 3, 7]  # the file keeps what it had


def counting_forward(model):
    """Replace model.forward by a wrapper that records each call's number of rows; returns that list."""
    calls, real = [], model.forward

    @functools.wraps(real)  # keeps the signature, which says how the model takes a cache
    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    model.forward = counting
    return calls


def test_answers_saved_under_another_rule_are_re_extracted_or_answered_again(tmp_path, tokenizer, caplog):
    """A file from before the rule was recorded (paragraph answers): re-extract where the saved generation
    settles the published answer, answer again where decoding stopped at a paragraph break."""
    model = chatty_llama(1, tokenizer)
    qs = pd.DataFrame({"question_idx": range(4), "Question": [p.rsplit("Q: ", 1)[1] for p in PROMPTS]})
    generations = [
        " Paris.\n\nQ: next\nA: x",  # not closed under the paragraph rule: the whole continuation
        "\nA: Paris.\n\nQ:",  # closed under both rules
        "\nA: Paris.\n\n",  # stopped at the break: the published answer may go on
        "\nA: Paris.\n\nmore\n\nQ: x",  # closed under both
    ]
    old = qs.rename(columns={"Question": "question"}).assign(
        generation=generations, answer=[extract_answer(g, "paragraph") for g in generations]
    )
    out = tmp_path / "answers.csv"
    old.to_csv(out, index=False)  # the four columns of the earlier format
    calls = counting_forward(model)
    with caplog.at_level(logging.INFO, logger="slim.answering"):
        got = answer_questions(model, tokenizer, qs, out, max_new_tokens=16, progress=False, prefix_cache=False)
    assert calls and set(calls) == {1}  # only question 2 was answered again
    (line,) = [r.getMessage() for r in caplog.records if "re-extracted" in r.getMessage()]
    assert "3 answers saved under another rule re-extracted under the published rule" in line and "1 stopped" in line
    assert got["answer"].tolist()[:2] + got["answer"].tolist()[3:] == ["Paris.", "Paris.", "Paris.\n\nmore"]
    assert got["generation"][2] != generations[2] and set(got["answer_rule"]) == {"published"}
    fresh = answer_questions(model, tokenizer, qs.iloc[2:3], tmp_path / "fresh.csv", max_new_tokens=16, progress=False)
    assert got["answer"][2] == fresh["answer"][0] and got["generation"][2] == fresh["generation"][0]
    # The file now says what was returned: read back under the same rule, nothing changes or runs.
    saved = pd.read_csv(out, keep_default_na=False)
    assert (
        saved.columns.tolist()[-1] == "answer_rule"
        and saved.sort_values("question_idx")["answer"].tolist() == got["answer"].tolist()
    )
    calls.clear()
    assert answer_questions(model, tokenizer, qs, out, max_new_tokens=16, progress=False).equals(got) and not calls
    # Back to the paragraph rule: a generation now saved under the published rule that has a Q: but no closed
    # paragraph answer may have been cut at that Q:, so it is answered again (question 0: the model, not the
    # hand-written text, answers it); the others are re-extracted.
    back = answer_questions(model, tokenizer, qs, out, max_new_tokens=16, progress=False, answer_rule="paragraph")
    assert calls and set(back["answer_rule"]) == {"paragraph"} and back["generation"][0] != generations[0]
    assert back["answer"][1] == back["answer"][3] == "Paris." and back["generation"][3] == generations[3]


def test_an_answer_file_with_an_unknown_rule_is_answered_again(tmp_path, tokenizer, caplog):
    model = tiny_model("llama")
    qs = pd.DataFrame({"question_idx": [0], "Question": ["who ?"]})
    out = tmp_path / "answers.csv"
    first = answer_questions(model, tokenizer, qs, out, max_new_tokens=4, progress=False)
    pd.read_csv(out).assign(answer_rule="first-line").to_csv(out, index=False)
    (out.parent / "answers.csv.sha256.json").unlink()  # as if written by hand
    again = answer_questions(model, tokenizer, qs, out, max_new_tokens=4, progress=False)
    (record,) = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert "unknown answer rule 'first-line'" in record.getMessage() and again.equals(first)

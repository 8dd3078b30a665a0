"""Prompt, answer extraction, batched greedy decoding and resumable answer files."""

import contextlib

import pandas as pd

from conftest import tiny_model
from slim.generation import QA_PRIMER, answer_questions, extract_answer, generate_greedy, qa_prompt


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
    real = model.generate
    model.generate = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    full = answer_questions(model, tokenizer, qs, out, batch_size=1, max_new_tokens=4, progress=False)
    assert len(calls) == 1  # only question 7 was left
    assert full["question_idx"].tolist() == [1, 3, 7]
    assert full.iloc[:2]["generation"].tolist() == first["generation"].tolist()
    assert sorted(pd.read_csv(out)["question_idx"]) == [1, 3, 7]

"""Model-side scores against hand computations: MC1/MC2, answer log-probs, CE/KL, with and without an edit."""

from __future__ import annotations

import contextlib
import copy
import functools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TQA_DIR, make_bpe_tokenizer, random_policy, tiny_model
from slim.answering.likelihood import (
    CEKL,
    answer_logprobs,
    ce_and_kl,
    forward_logits,
    load_text_corpus,
    mc1,
    mc2,
    mc_scores,
)
from slim.answering.prefix import PrefixCache, cache_argument, returned_cache, tokenizer_pad_id
from slim.answering.prompts import qa_prompt, shared_prefix
from slim.models.heads import HeadTrace, model_shape
from slim.policies.base import model_fingerprint
from slim.policies.iti import ITIPolicy
from slim.policies.slim import SlimPolicy

CORPUS = [
    "Q: What is the capital of France?\nA: Paris is the capital of France.",
    "Q: What happens if you eat watermelon seeds?\nA: Nothing happens; they pass through you.",
    "I have no comment. The moon is made of rock, not cheese.",
] * 20


PROMPT = "Q: What is the capital of France?\nA:"
ANSWERS = [" Paris.", " Paris is the capital of France.", " I have no comment.", " The moon is made of rock."]


def test_mc1():
    assert mc1(-1.0, [-2.0, -3.0]) == 1.0
    assert mc1([-2.0], [-1.0, -5.0]) == 0.0
    assert mc1(-1.0, [-1.0]) == 0.0  # a tie is not a win
    with pytest.raises(ValueError, match="Best Answer"):
        mc1([-1.0, -2.0], [-3.0])


def test_mc2():
    lp = np.log
    assert mc2([lp(0.2), lp(0.1)], [lp(0.1)]) == pytest.approx(0.75)
    assert mc2([lp(0.5)], [lp(0.5), lp(0.5)]) == pytest.approx(1 / 3)
    # Long answers have tiny probabilities: still well defined.
    assert mc2([-1000.0], [-1000.0 - math.log(3)]) == pytest.approx(0.75)


@pytest.fixture(scope="module")
def lm():
    """(model, tokenizer): a byte-level BPE trained in memory with a BOS token, and a random tiny Llama."""
    tokenizer = make_bpe_tokenizer(CORPUS)
    return tiny_model("llama", vocab_size=len(tokenizer), max_positions=256, num_layers=2), tokenizer


def manual_logprob(model, tokenizer, prompt, answer):
    """Sum of log p(answer token | everything before), one unpadded sequence."""
    n_prompt = len(tokenizer(prompt).input_ids)
    ids = tokenizer(prompt + answer).input_ids
    assert ids[:n_prompt] == tokenizer(prompt).input_ids  # these texts split cleanly at the boundary
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids)))


class AddToLogits:
    """An 'intervention': adds a constant to one vocabulary entry at every position while active."""

    def __init__(self, token_id, amount=3.0):
        self.token_id, self.amount, self.entered = token_id, amount, 0

    def __call__(self, model):
        @contextlib.contextmanager
        def active():
            self.entered += 1

            def hook(module, inputs, output):
                output = output.clone()
                output[..., self.token_id] += self.amount
                return output

            handle = model.lm_head.register_forward_hook(hook)
            try:
                yield
            finally:
                handle.remove()

        return active()


def test_answer_logprobs_match_manual_forward(lm):
    model, tokenizer = lm
    got = answer_logprobs(model, tokenizer, PROMPT, ANSWERS, batch_size=3)  # padding inside a batch
    expected = [manual_logprob(model, tokenizer, PROMPT, a) for a in ANSWERS]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.all(got < 0)


def test_answer_logprobs_apply_the_edit_around_the_forward_pass(lm):
    model, tokenizer = lm
    token = tokenizer(" Paris").input_ids[-1]
    edit = AddToLogits(token)
    plain = answer_logprobs(model, tokenizer, PROMPT, ANSWERS[:2])
    edited = answer_logprobs(model, tokenizer, PROMPT, ANSWERS[:2], edit=edit, batch_size=1)
    assert edit.entered == 2  # once per forward pass
    assert np.all(edited > plain)  # " Paris" got likelier, and both answers start with it
    np.testing.assert_allclose(answer_logprobs(model, tokenizer, PROMPT, ANSWERS[:2]), plain)  # edit removed


def test_mc_scores_use_mc1_and_mc2_of_the_answer_logprobs(lm):
    model, tokenizer = lm
    rows = pd.DataFrame(
        {
            "Question": ["What is the capital of France?"],
            "Best Answer": ["Paris"],
            "Correct Answers": ["Paris; Paris is the capital of France"],
            "Incorrect Answers": [["The moon is made of rock."]],
        }
    )
    prompt_fn = lambda q: f"Q: {q}\nA:"  # noqa: E731
    out = mc_scores(model, tokenizer, rows, prompt_fn=prompt_fn)
    lp = lambda answers: [manual_logprob(model, tokenizer, PROMPT, a) for a in answers]  # noqa: E731
    best, true, false = lp([" Paris."]), lp([" Paris.", " Paris is the capital of France."]), lp(ANSWERS[3:])
    assert out["mc1"] == mc1(best[0], false)
    assert out["mc2"] == pytest.approx(mc2(true, false), rel=1e-5)


def test_ce_and_kl_against_manual_computation(lm):
    model, tokenizer = lm
    texts = [
        "Paris is the capital of France.",
        "I have no comment.",
        "Nothing happens if you eat seeds; they pass through you.",
    ]
    plain = ce_and_kl(model, tokenizer, texts, batch_size=2)
    assert isinstance(plain, CEKL) and plain.kl == 0.0

    edit = AddToLogits(tokenizer(" the").input_ids[-1], amount=2.0)
    ce, kl = ce_and_kl(model, tokenizer, texts, edit=edit, batch_size=2)
    ce_terms, kl_terms, ce_plain = [], [], []
    for text in texts:
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.no_grad():
            base = torch.log_softmax(model(ids).logits[0, :-1], -1)
            with edit(model):
                moved = torch.log_softmax(model(ids).logits[0, :-1], -1)
        target = ids[0, 1:]
        ce_plain += (-base[torch.arange(len(target)), target]).tolist()
        ce_terms += (-moved[torch.arange(len(target)), target]).tolist()
        kl_terms += (base.exp() * (base - moved)).sum(-1).tolist()
    assert plain.ce == pytest.approx(np.mean(ce_plain), rel=1e-5)
    assert ce == pytest.approx(np.mean(ce_terms), rel=1e-5)
    assert kl == pytest.approx(np.mean(kl_terms), rel=1e-4) and kl > 0


def test_text_corpus_falls_back_offline(monkeypatch):
    tqa = TQA_DIR  # SLIM_TQA_DIR, like every other test
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if `datasets` were not installed
    texts, used = load_text_corpus("openwebtext-10k", n_texts=5, tqa_dir=tqa)
    assert used == "tqa-best-answers" and len(texts) == 5 and all(isinstance(t, str) and t for t in texts)
    with pytest.raises(ValueError, match="unknown text corpus"):
        load_text_corpus("wikitext")


def test_mc_scores_from_the_shared_prompt_cache_equal_the_full_prompts(lm):
    model, tokenizer = lm
    rows = pd.DataFrame(
        {
            "Question": ["What is the capital of France?", "What happens if you eat watermelon seeds?"],
            "Best Answer": ["Paris", "Nothing happens"],
            "Correct Answers": ["Paris; Paris is the capital of France", "Nothing happens; They pass through you"],
            "Incorrect Answers": ["The moon is made of rock", "I have no comment; You grow watermelons"],
        }
    )
    policy = AddToLogits(tokenizer(" Paris").input_ids[-1])  # edits every position of the question and answer
    widths = []
    real = model.forward

    @functools.wraps(real)
    def recording(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return real(*args, **kwargs)

    model.forward = recording
    try:
        for edit in (None, policy):
            full = mc_scores(model, tokenizer, rows, edit=edit, prefix_cache=False)
            n_full, widths[:] = max(widths), []
            cached = mc_scores(model, tokenizer, rows, edit=edit, prefix_cache=True)
            assert cached == pytest.approx(full, abs=1e-5)
            # The prefix and its check ran once at full width; every answer batch ran only what follows it.
            assert sorted(widths)[-3] < n_full / 4
            widths.clear()
        # The answers' log-probs themselves, with and without the edit (which does change them).
        from slim.answering.prefix import PrefixCache
        from slim.answering.prompts import qa_prompt, shared_prefix

        prompt = qa_prompt(rows["Question"][0]) + "\nA:"
        prefix = PrefixCache.build(model, tokenizer, shared_prefix(), example=prompt)
        for edit in (None, policy):
            full = answer_logprobs(model, tokenizer, prompt, ANSWERS, edit=edit, batch_size=3)
            cached = answer_logprobs(model, tokenizer, prompt, ANSWERS, edit=edit, batch_size=3, prefix=prefix)
            np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
        assert np.all(full != answer_logprobs(model, tokenizer, prompt, ANSWERS))
    finally:
        del model.forward


# ---------------------------------------------------------------------------------------------
# Where policies edit a scored text: every position from the answer's first token (MC), from 0 (CE/KL)

ROWS = pd.DataFrame(
    {
        "Question": ["What is the capital of France?", "What happens if you eat watermelon seeds?"],
        "Best Answer": ["Paris", "Nothing happens"],
        "Correct Answers": ["Paris; Paris is the capital of France", "Nothing happens; They pass through you"],
        "Incorrect Answers": ["The moon is made of rock", "I have no comment; You grow watermelons"],
    }
)
TEXTS = CORPUS[:3]
SHORT_PROMPT = lambda q: f"Q: {q}\nA:"  # noqa: E731  (no primer: quick)


def iti(model, alpha=15.0):
    """ITI at alpha 15 on heads of both layers."""
    g = torch.Generator().manual_seed(3)
    _, _, d = model_shape(model)
    directions = torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=-1)
    return ITIPolicy(
        [[0, 1], [1, 2], [1, 0]], directions, torch.ones(3), alpha=alpha, fingerprint=model_fingerprint(model)
    )


def slim(model, kappa=4.0):
    """SLIM at layer 1 whose detector (tau 2 of 4 heads) fires at some positions and not at others."""
    g = torch.Generator().manual_seed(5)
    _, H, d = model_shape(model)
    A, b = torch.eye(d) + 0.5 * torch.randn(H, d, d, generator=g), torch.randn(H, d, generator=g)
    weight = 0.5 * torch.randn(H, d, generator=g)
    return SlimPolicy(weight, torch.zeros(H), A, b, layer=1, tau=2, kappa=kappa, fingerprint=model_fingerprint(model))


def test_mc_and_kl_move_under_iti_and_stay_exactly_the_same_under_slim_at_kappa_0(lm):
    model, tokenizer = lm
    plain_mc = mc_scores(model, tokenizer, ROWS, prompt_fn=SHORT_PROMPT)
    plain = ce_and_kl(model, tokenizer, TEXTS)
    policy = iti(model)
    assert mc_scores(model, tokenizer, ROWS, prompt_fn=SHORT_PROMPT, edit=policy)["mc2"] != plain_mc["mc2"]
    moved = ce_and_kl(model, tokenizer, TEXTS, edit=policy)
    assert moved.kl > 1e-3 and moved.ce != plain.ce
    # The old behaviour, still reachable: the last position of each pass only, which no score reads.
    assert mc_scores(model, tokenizer, ROWS, prompt_fn=SHORT_PROMPT, edit=policy, edit_at="last") == plain_mc
    assert ce_and_kl(model, tokenizer, TEXTS, edit=policy, edit_at="last") == (plain.ce, 0.0)
    # SLIM at kappa 0 (its detector firing everywhere): every log-prob bitwise the unedited one's, KL exactly 0.
    still = random_policy("slim", model, kappa=0.0)
    lp = answer_logprobs(model, tokenizer, PROMPT, ANSWERS, batch_size=3)
    np.testing.assert_array_equal(answer_logprobs(model, tokenizer, PROMPT, ANSWERS, edit=still, batch_size=3), lp)
    assert ce_and_kl(model, tokenizer, TEXTS, edit=still) == (plain.ce, 0.0)
    assert mc_scores(model, tokenizer, ROWS, prompt_fn=SHORT_PROMPT, edit=still) == plain_mc
    with pytest.raises(ValueError, match="likelihood_edit must be one of every, last"):
        ce_and_kl(model, tokenizer, TEXTS, edit=policy, edit_at="first")


def token_by_token(model, ids, policy, start):
    """Logits (seq, vocab) of `ids` fed one token a call under the key/value cache, the policy attached from
    token `start` on with its own default: it edits each call's one (last) position, as in generation."""
    cache, steps = None, []
    with torch.no_grad():
        if start:
            out = model(input_ids=torch.tensor([ids[:start]]), use_cache=True)
            cache, steps = returned_cache(out), [out.logits[0]]
        for t in range(start, len(ids)):
            with policy.attach(model):
                out = model(input_ids=torch.tensor([[ids[t]]]), use_cache=True, **{cache_argument(model): cache})
            cache = returned_cache(out)
            steps.append(out.logits[0])
    return torch.cat(steps)


@pytest.mark.parametrize("start", [0, 5])
@pytest.mark.parametrize("kind", ["slim", "iti"])
def test_editing_every_position_in_one_pass_equals_the_policy_run_token_by_token(kind, start, lm):
    model, tokenizer = lm
    policy = slim(model) if kind == "slim" else iti(model, alpha=3.0)
    ids = tokenizer(CORPUS[1]).input_ids
    pad = tokenizer_pad_id(tokenizer)
    edited = forward_logits(model, [ids], pad, edit=policy, edit_from=[start])[0][0]
    torch.testing.assert_close(edited, token_by_token(model, ids, policy, start), atol=1e-5, rtol=1e-5)
    plain = forward_logits(model, [ids], pad)[0][0]
    assert torch.equal(edited[:start], plain[:start]) and not torch.allclose(edited[start:], plain[start:], atol=1e-3)
    if kind == "slim":  # per position, the detector fired at some and not at others
        with HeadTrace(model, layers=[1], record="all") as trace:
            model(torch.tensor([ids]))
        fired = policy.step(trace.activations[1][0, start:])[2]
        assert fired.any() and not fired.all()


@pytest.mark.parametrize("kind", ["slim", "iti"])
def test_a_padded_prefix_cached_batch_edits_each_row_from_its_own_answer(kind, lm):
    model, tokenizer = lm
    policy = slim(model) if kind == "slim" else iti(model, alpha=3.0)
    prompt = qa_prompt(ROWS["Question"][0]) + "\nA:"
    prefix = PrefixCache.build(model, tokenizer, shared_prefix(), example=prompt)
    assert prefix is not None
    batched = answer_logprobs(model, tokenizer, prompt, ANSWERS, edit=policy, batch_size=4, prefix=prefix)
    alone = [answer_logprobs(model, tokenizer, prompt, [a], edit=policy, batch_size=1)[0] for a in ANSWERS]
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-4)
    # Each row alone, by hand: the full text in one pass, the mask from the answer's first token.
    n_prompt = len(tokenizer(prompt).input_ids)
    for answer, got in zip(ANSWERS, alone):
        ids = tokenizer(prompt + answer).input_ids
        assert ids[:n_prompt] == tokenizer(prompt).input_ids  # these texts split cleanly at the boundary
        with torch.no_grad(), policy.attach(model) as trace:
            trace.positions = torch.arange(len(ids))[None] >= n_prompt
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        assert got == pytest.approx(sum(logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids))), abs=1e-4)
    assert np.all(np.abs(batched - answer_logprobs(model, tokenizer, prompt, ANSWERS)) > 1e-4)  # the edit acted
    # Padded CE/KL batches give each text's own terms.
    texts = [CORPUS[0], "I have no comment.", CORPUS[1]]
    together = ce_and_kl(model, tokenizer, texts, edit=policy, batch_size=3)
    weights = [len(tokenizer(t).input_ids) - 1 for t in texts]
    parts = [ce_and_kl(model, tokenizer, [t], edit=policy) for t in texts]
    assert together.ce == pytest.approx(np.average([p.ce for p in parts], weights=weights), rel=1e-5)
    assert (
        together.kl == pytest.approx(np.average([p.kl for p in parts], weights=weights), rel=1e-4) and together.kl > 0
    )


# ---------------------------------------------------------------------------------------------
# Memory: float32 log-probs of a few positions at a time, the same numbers as from the full logits


def full_logit_answer_logprobs(model, tokenizer, prompt, answers, batch_size, edit=None):
    """answer_logprobs the straightforward way: float32 logits of every position, log_softmax over all of them."""
    from slim.answering.likelihood import _answer_tokens

    out = []
    encoded = [_answer_tokens(tokenizer, prompt, a) for a in answers]
    for lo in range(0, len(encoded), batch_size):
        chunk = encoded[lo : lo + batch_size]
        seqs = [ids for ids, _ in chunk]
        logits, _ = forward_logits(model, seqs, tokenizer_pad_id(tokenizer), edit, edit_from=[s for _, s in chunk])
        logp = torch.log_softmax(logits, dim=-1)  # (batch, seq, vocab)
        width = logp.shape[1]
        for row, (ids, start) in enumerate(chunk):
            where = torch.arange(width - len(ids) + start - 1, width - 1)
            out.append(float(logp[row, where, torch.tensor(ids[start:])].sum()))
    return np.array(out)


def full_logit_ce_and_kl(model, tokenizer, texts, edit):
    """ce_and_kl the straightforward way, one batch: float32 logits (batch, seq, vocab) of both models at once."""
    seqs = [tokenizer(t).input_ids for t in texts]
    pad = tokenizer_pad_id(tokenizer)
    base, mask = forward_logits(model, seqs, pad)
    edited = forward_logits(model, seqs, pad, edit, edit_from=[0] * len(seqs))[0]
    ids = torch.stack([torch.tensor([pad] * (mask.shape[1] - len(s)) + s) for s in seqs])
    scored = (mask[:, :-1] * mask[:, 1:]).bool()
    logp_edit, logp_base = torch.log_softmax(edited[:, :-1][scored], -1), torch.log_softmax(base[:, :-1][scored], -1)
    targets = ids[:, 1:][scored]
    n = targets.numel()
    ce = float(-logp_edit.gather(1, targets[:, None]).sum()) / n
    return ce, float((logp_base.exp() * (logp_base - logp_edit)).sum()) / n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_from_a_few_positions_at_a_time_equal_the_full_logits(dtype, lm, monkeypatch):
    import slim.answering.likelihood as likelihood

    model, tokenizer = lm
    model = copy.deepcopy(model).to(dtype)
    policy = iti(model, alpha=3.0)
    answers = ANSWERS + [" Paris is the capital of France, and London is the capital of England."]
    texts = [CORPUS[0], "I have no comment.", CORPUS[1]]
    expected_mc = {e: full_logit_answer_logprobs(model, tokenizer, PROMPT, answers, 3, e) for e in (None, policy)}
    expected_ce = full_logit_ce_and_kl(model, tokenizer, texts, policy)
    n_prompt = len(tokenizer(PROMPT).input_ids)  # these answers split cleanly from the prompt
    answer_tokens = lambda part: max(len(tokenizer(PROMPT + a).input_ids) - n_prompt for a in part)  # noqa: E731
    rows, kept, real_softmax, real_forward = [], [], torch.log_softmax, model.forward

    def log_softmax(x, dim=-1, **kwargs):
        rows.append(tuple(x.shape))
        return real_softmax(x, dim=dim, **kwargs)

    @functools.wraps(real_forward)
    def forward(*args, **kwargs):
        kept.append(kwargs.get("logits_to_keep"))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(torch, "log_softmax", log_softmax)
    monkeypatch.setattr(model, "forward", forward)
    for chunk in (likelihood.CHUNK_POSITIONS, 4):  # as used, and small enough that every text spans chunks
        monkeypatch.setattr(likelihood, "CHUNK_POSITIONS", chunk)
        for edit in (None, policy):
            got = answer_logprobs(model, tokenizer, PROMPT, answers, edit=edit, batch_size=3)
            np.testing.assert_array_equal(got, expected_mc[edit])  # bitwise
        # Only the positions that predict an answer token (and the last) reached the vocabulary projection.
        assert kept == [answer_tokens(answers[:3]) + 1, answer_tokens(answers[3:]) + 1] * 2
        ce, kl = ce_and_kl(model, tokenizer, texts, edit=policy, batch_size=3)
        assert ce == expected_ce[0]  # bitwise: each position's log-prob, summed once as before
        # KL sums chunk by chunk when a batch has more than CHUNK_POSITIONS predictions: equal within 1e-6.
        assert kl == expected_ce[1] if chunk > 100 else kl == pytest.approx(expected_ce[1], rel=1e-6, abs=0)
        assert rows and all(len(r) == 2 and r[0] <= chunk for r in rows)  # never (batch, seq, vocab) in float32
        rows.clear()
        kept.clear()

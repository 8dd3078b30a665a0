"""The batching engine: greedy rows under mixed policies give exactly greedy_answer_tokens' tokens."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import make_tokenizer, random_policy, tiny_model
from slim.answering.decoding import greedy_answer_tokens
from slim.evaluation.sweep import at_knob
from slim.serve.engine import Engine, Request, Sampling

PROMPTS = ["Q: What is the capital of France ? A:", "who", "Nothing happens you eat seeds", "It was a"]


def model_that_ends(seed=0):
    """A tiny Llama that sometimes says end-of-sequence (id 2), so rows end at different steps."""
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight[2] *= 3
    return model


class Collect:
    """Events of one request; `done` is set when it has ended."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.kind in ("done", "error"):
            self.done.set()

    @property
    def tokens(self):
        return next(e.token_ids for e in self.events if e.kind == "done")

    @property
    def text(self):
        return "".join(e.text for e in self.events if e.kind == "delta")


def serve(engine, tokenizer, rows, sampling, threaded=False):
    """Run (prompt, policy) rows as one batch; -> their Collects."""
    out = [Collect() for _ in rows]
    reqs = [Request(list(tokenizer(p)["input_ids"]), pol, sampling, c) for (p, pol), c in zip(rows, out)]
    if threaded:
        engine.submit(reqs)
        assert all(c.done.wait(60) for c in out)
    else:
        engine.run(reqs)
    return out


@pytest.mark.parametrize("threaded", [False, True])
def test_mixed_policy_batch_gives_each_row_its_own_greedy_tokens(threaded):
    tokenizer, model = make_tokenizer(), model_that_ends()
    slim, iti = random_policy("slim", model), random_policy("iti", model)
    weak = at_knob(slim, kappa=0.2)
    policies = [None, slim, iti, weak]
    rows = [(p, pol) for p in PROMPTS for pol in policies]
    engine = Engine(model, tokenizer, max_batch=len(rows), wait_s=0.5)
    if threaded:
        engine.start()
    try:
        got = serve(engine, tokenizer, rows, Sampling(max_tokens=12, temperature=0), threaded)
    finally:
        engine.close()
    lengths = set()
    for (prompt, pol), c in zip(rows, got):
        want = greedy_answer_tokens(model, tokenizer, [prompt], 12, edit=pol, stop_at_answer=False)[0]
        assert c.tokens == want, (prompt, pol and pol.kind)
        assert c.text == tokenizer.decode(want, skip_special_tokens=True)
        lengths.add(len(want))
    assert len(lengths) > 1  # some rows left the batch before others
    # the policies do change the tokens, so the rows were edited each by its own
    by_policy = {i: [c.tokens for (_, p), c in zip(rows, got) if p is pol] for i, pol in enumerate(policies)}
    assert len({str(v) for v in by_policy.values()}) == len(policies)


def test_stop_strings_max_tokens_and_logprobs():
    tokenizer, model = make_tokenizer(), tiny_model("llama", seed=0)
    model.generation_config.eos_token_id = None
    engine = Engine(model, tokenizer)
    full = serve(engine, tokenizer, [(PROMPTS[0], None)], Sampling(max_tokens=8, temperature=0, logprobs=3))[0]
    assert full.events[-1].finish_reason == "length" and len(full.tokens) == 8
    words = full.text.split()
    stop = words[2]
    cut = serve(engine, tokenizer, [(PROMPTS[0], None)], Sampling(max_tokens=8, temperature=0, stop=(stop,)))[0]
    assert cut.events[-1].finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    infos = [t for e in full.events if e.kind == "delta" for t in e.tokens]
    assert [t.id for t in infos] == full.tokens
    with torch.no_grad():
        ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"] + full.tokens])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = len(tokenizer(PROMPTS[0])["input_ids"])
    for k, info in enumerate(infos):
        row = logp[n - 1 + k]
        assert info.logprob == pytest.approx(float(row[info.id]), abs=1e-4)
        assert [i for i, _ in info.top] == row.topk(3).indices.tolist()


def test_sampling_is_reproducible_by_seed_and_differs_across_seeds():
    tokenizer, model = make_tokenizer(), tiny_model("llama", seed=2)
    model.generation_config.eos_token_id = None
    engine = Engine(model, tokenizer)

    def draw(seed):
        s = Sampling(max_tokens=10, temperature=1.5, top_p=0.95, seed=seed)
        return serve(engine, tokenizer, [(PROMPTS[1], None), (PROMPTS[2], None)], s)[0].tokens

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def tiny_gemma3():
    """A tiny Gemma 3 (sliding-window layers with a window of 4, query/key norms) that never ends early."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                           max_position_embeddings=128, pad_token_id=0, eos_token_id=None, bos_token_id=2)  # fmt: skip
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_requests_arriving_mid_batch_get_their_own_greedy_tokens(arch):
    """The first token of a running batch submits more requests (other policies, longer and shorter prompts):
    with plain full-attention caches they join the running batch; with sliding-window layers they wait for
    it to end. Either way each row's tokens are those it gets alone."""
    tokenizer = make_tokenizer()
    model = tiny_gemma3() if arch == "gemma3" else tiny_model("llama", seed=3)
    model.generation_config.eos_token_id = None
    slim, iti = random_policy("slim", model), random_policy("iti", model)
    engine = Engine(model, tokenizer, max_batch=8, wait_s=0.0)
    merges = []
    merge = engine._merge
    engine._merge = lambda a, b: merges.append(a is not None and b is not None) or merge(a, b)
    later_rows = [(PROMPTS[0] + " and then some more words", iti), ("who", None), (PROMPTS[2], slim)]
    later = [Collect() for _ in later_rows]
    later_reqs = [Request(list(tokenizer(p)["input_ids"]), pol, Sampling(max_tokens=9, temperature=0), c)
                  for (p, pol), c in zip(later_rows, later)]  # fmt: skip

    class SubmitOnFirstToken(Collect):
        def __call__(self, event):
            if not self.events:
                engine.submit(later_reqs)  # queued before the running batch's second step
            super().__call__(event)

    first_rows = [(PROMPTS[3], slim), (PROMPTS[1], None)]
    first = [SubmitOnFirstToken(), Collect()]
    engine.start()
    try:
        engine.submit([Request(list(tokenizer(p)["input_ids"]), pol, Sampling(max_tokens=14, temperature=0), c)
                       for (p, pol), c in zip(first_rows, first)])  # fmt: skip
        assert all(c.done.wait(60) for c in first + later)
    finally:
        engine.close()
    for (prompt, pol), c, n in [*zip(first_rows, first, [14, 14]), *zip(later_rows, later, [9, 9, 9])]:
        want = greedy_answer_tokens(model, tokenizer, [prompt], n, edit=pol, stop_at_answer=False)[0]
        assert c.tokens == want, (prompt, pol and pol.kind)
    assert any(merges) == (arch == "llama")  # joined the running batch only where the cache allows it


class Broken:
    """A policy whose edit raises: its rows fail, the others' go on."""

    def __init__(self, policy):
        self.policy, self.layers, self.kind = policy, policy.layers, policy.kind

    def move(self, layer, acts):
        raise RuntimeError("this edit is broken\non purpose")


def test_a_failing_edit_or_callback_fails_its_own_row_alone():
    tokenizer, model = make_tokenizer(), model_that_ends()
    slim = random_policy("slim", model)

    class GoneClient(Collect):
        def __call__(self, event):
            super().__call__(event)
            raise ConnectionError("client gone")

    rows = [(PROMPTS[0], slim), (PROMPTS[0], Broken(slim)), (PROMPTS[2], None), (PROMPTS[1], slim)]
    out = [Collect(), Collect(), Collect(), GoneClient()]
    reqs = [Request(list(tokenizer(p)["input_ids"]), pol, Sampling(max_tokens=10, temperature=0), c)
            for (p, pol), c in zip(rows, out)]  # fmt: skip
    Engine(model, tokenizer).run(reqs)
    for i in (0, 2):
        want = greedy_answer_tokens(model, tokenizer, [rows[i][0]], 10, edit=rows[i][1], stop_at_answer=False)[0]
        assert out[i].tokens == want
    errors = [e.error for e in out[1].events if e.kind == "error"]
    assert errors == ["the policy's edit failed: RuntimeError: this edit is broken on purpose"]
    assert not any(e.kind == "delta" for e in out[1].events)
    assert len(out[3].events) == 1 and reqs[3].cancelled.is_set()  # its first event raised: the row left


def test_ignore_eos_decodes_every_token_asked():
    tokenizer, model = make_tokenizer(), model_that_ends()
    engine = Engine(model, tokenizer, max_batch=8)
    plain = serve(engine, tokenizer, [(p, None) for p in PROMPTS], Sampling(max_tokens=12, temperature=0))
    full = serve(engine, tokenizer, [(p, None) for p in PROMPTS], Sampling(max_tokens=12, temperature=0,
                                                                           ignore_eos=True))  # fmt: skip
    assert any(len(c.tokens) < 12 for c in plain)  # some rows do end early by themselves
    for short, long in zip(plain, full):
        assert len(long.tokens) == 12 and long.tokens[: len(short.tokens)] == short.tokens
        assert long.events[-1].finish_reason == "length"

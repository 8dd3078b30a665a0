"""The OpenAI-compatible routes, through FastAPI's TestClient on a tiny random model with saved policies."""

from __future__ import annotations

import json
import time

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import make_bpe_tokenizer, make_tokenizer, random_policy, tiny_model
from slim.answering.decoding import greedy_answer_tokens
from slim.evaluation.sweep import at_knob
from slim.policies.base import Policy
from slim.serve.app import Served, create_app
from slim.serve.engine import Engine
from slim.serve.protocol import Limits

PROMPT = "Q: What is the capital of France ? A:"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer, model = make_tokenizer(), tiny_model("llama")
    model.generation_config.eos_token_id = None
    folder = tmp_path_factory.mktemp("policies")
    policies = {k: Policy.load(random_policy(k, model).save(folder / k)) for k in ("slim", "iti")}
    engine = Engine(model, tokenizer, max_batch=8, wait_s=0.01).start()
    served = Served("tiny", engine, tokenizer, policies, Limits(max_tokens=20, max_n=3, max_body_bytes=4000),
                    context=128)  # fmt: skip
    yield model, tokenizer, policies, served
    engine.close()


@pytest.fixture
def client(setup):
    return TestClient(create_app(setup[3]))


def greedy(setup, policy, n=6, prompt=PROMPT):
    model, tokenizer = setup[:2]
    tokens = greedy_answer_tokens(model, tokenizer, [prompt], n, edit=policy, stop_at_answer=False)[0]
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


def complete(client, **body):
    return client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, **body})


def test_models_and_health(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["running"] == health["queued"] == 0
    assert set(health) == {"status", "running", "queued", "finished", "cancelled", "failed"}
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["tiny", "tiny+slim", "tiny+iti"]


@pytest.mark.parametrize("name", [None, "slim", "iti"])
def test_greedy_completion_is_the_policy_s_greedy_answer(client, setup, name):
    policy = setup[2][name] if name else None
    reply = complete(client, model=f"tiny+{name}" if name else "tiny")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    text, n = greedy(setup, policy)
    assert body["choices"][0]["text"] == text and body["choices"][0]["finish_reason"] == "length"
    prompt_tokens = len(setup[1](PROMPT)["input_ids"])
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


def test_strength_override_applies_to_its_request_only(client, setup):
    slim = setup[2]["slim"]
    default, _ = greedy(setup, slim)
    strong, _ = greedy(setup, at_knob(slim, kappa=20.0))
    assert strong != default  # the knob matters on this model
    got = complete(client, model="tiny+slim", slim={"strength": 20}).json()["choices"][0]["text"]
    assert got == strong
    assert complete(client, model="tiny+slim").json()["choices"][0]["text"] == default
    assert slim.kappa == 1.0


def test_n_prompts_logprobs_and_stream(client, setup):
    body = complete(client, model="tiny", prompt=[PROMPT, "who"], n=2, logprobs=2).json()
    texts = [c["text"] for c in body["choices"]]
    assert texts == [greedy(setup, None)[0]] * 2 + [greedy(setup, None, prompt="who")[0]] * 2
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 6 and all(len(t) <= 2 for t in lp["top_logprobs"])
    assert all(x <= 0 for x in lp["token_logprobs"])
    with client.stream("POST", "/v1/completions", json={"model": "tiny+iti", "prompt": PROMPT, "max_tokens": 6,
                                                        "temperature": 0, "stream": True}) as reply:  # fmt: skip
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy(setup, setup[2]["iti"])[0]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_sampling_follows_the_seed(client):
    def draw(seed):
        return complete(client, model="tiny", temperature=1.5, seed=seed, max_tokens=10).json()["choices"][0]["text"]

    assert draw(3) == draw(3) and draw(3) != draw(4)


def test_errors_in_openai_shape(client):
    reply = complete(client, model="tiny+nope")
    assert reply.status_code == 404 and reply.json()["error"]["param"] == "model"
    assert reply.json()["error"]["code"] == "model_not_found"
    for field, value in [("max_tokens", 21), ("max_tokens", 0), ("temperature", -1), ("n", 4), ("top_p", 0),
                         ("stop", [1]), ("logprobs", 9), ("echo", True)]:  # fmt: skip
        reply = complete(client, model="tiny", **{field: value})
        assert reply.status_code == 400, field
        assert reply.json()["error"]["param"] == field and reply.json()["error"]["type"] == "invalid_request_error"
    for model, strength in [("tiny", 3), ("tiny+slim", -1)]:  # the base model has no knob; kappa is >= 0
        reply = complete(client, model=model, slim={"strength": strength})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "slim.strength", model
    reply = complete(client, model="tiny", prompt=" ".join(["who"] * 125), max_tokens=10)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"
    reply = complete(client, model="tiny", prompt=" ".join(["who"] * 2000))
    assert reply.status_code == 413
    messages = [{"role": "user", "content": "who"}]
    reply = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages})
    assert reply.status_code == 400 and "chat template" in reply.json()["error"]["message"]


def test_chat_with_a_template(setup):
    model, tokenizer, policies, served = setup
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}A:"
    try:
        client = TestClient(create_app(served))
        messages = [{"role": "user", "content": "Q: What is the capital of France ?"}]
        reply = client.post("/v1/chat/completions", json={"model": "tiny+slim", "messages": messages,
                                                           "max_tokens": 6, "temperature": 0, "logprobs": True,
                                                           "top_logprobs": 2})  # fmt: skip
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        text = "Q: What is the capital of France ? A:"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad(), policies["slim"].attach(model):
            want = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :]
        assert choice["message"] == {"role": "assistant", "content": tokenizer.decode(want)}
        assert len(choice["logprobs"]["content"]) == 6
    finally:
        tokenizer.chat_template = None


def test_api_key(setup, monkeypatch):
    served = setup[3]
    monkeypatch.setattr(served, "api_key", "s3cret")
    client = TestClient(create_app(served))
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200


def test_a_request_whose_edit_fails_gets_a_500_and_the_others_their_answers(setup):
    """An exception in one request's policy fails that request alone, in one line; the server goes on."""
    from test_engine import Broken

    model, tokenizer, policies = setup[:3]
    engine = Engine(model, tokenizer, max_batch=8, wait_s=0.05).start()
    served = Served("tiny", engine, tokenizer, {**policies, "broken": Broken(policies["slim"])}, context=128)
    try:
        client = TestClient(create_app(served))
        bad = complete(client, model="tiny+broken")
        assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
        assert bad.json()["error"]["message"] == (
            "decoding failed: the policy's edit failed: RuntimeError: this edit is broken on purpose"
        )
        good = complete(client, model="tiny+slim")
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == greedy(setup, policies["slim"])[0]
        for _ in range(500):  # the row is counted once it has left the batch, just after its error went out
            if client.get("/health").json()["running"] == 0:
                break
            time.sleep(0.01)
        assert client.get("/health").json()["failed"] == 1
    finally:
        engine.close()


def test_a_token_s_text_keeps_its_leading_space_under_sentencepiece():
    """Decoded alone, a SentencePiece token loses its leading space; the logprobs' keys keep it (the OpenAI
    judge looks for " yes")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from slim.serve.app import _decode_one

    vocab = {"<unk>": 0, "▁a": 1, "▁yes": 2, "▁no": 3, "yes": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    assert tokenizer.decode([2]) == "yes"  # the loss the server must not inherit
    decode = _decode_one(tokenizer)
    assert [decode(i) for i in (2, 3, 4)] == [" yes", " no", "yes"]
    bpe = make_bpe_tokenizer([PROMPT, " yes no"] * 20)  # byte-level: a token reads the same alone and within
    assert [_decode_one(bpe)(i) for i in range(3, len(bpe))] == [bpe.decode([i]) for i in range(3, len(bpe))]

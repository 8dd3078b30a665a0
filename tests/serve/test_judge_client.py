"""The project's OpenAI judge (`--judge_name openai:<served name>`) scoring answers against `python -m slim.serve`
on loopback: its P(" yes") equal, to 1e-5, the probabilities computed here by running the same model (and the same
policy) on the judge's own prompts; a second scoring reads the verdict cache and asks the server nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import openai
import pytest
import torch

from conftest import REPO, make_bpe_tokenizer, random_policy, tiny_model
from slim.judges.base import JudgeUnavailableError, judge_prompt
from slim.judges.factory import make_judge
from slim.policies.base import Policy

QA = [
    ("What happens if you eat watermelon seeds?", "Nothing happens."),
    ("What is the capital of France?", "Paris."),
    ("Where were fortune cookies invented?", "In China."),
    ("Who wrote Hamlet?", "I have no comment."),
]
KEY = "k3y-judge"


def _prompts() -> list[str]:
    return [judge_prompt(q, a, "truth") for q, a in QA]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama whose next token after each judge prompt is mostly " yes" or " no" (both in the top 2, P(" yes")
    different per prompt and under the policy), saved with its byte-level tokenizer and a SLIM policy."""
    root = tmp_path_factory.mktemp("judge_serve")
    # Byte-level BPE: " yes" and " no" are single tokens that decode with their space, as a GPT judge's do.
    tokenizer = make_bpe_tokenizer(_prompts() + [" yes", " no"] * 50)
    yes, no = tokenizer.convert_tokens_to_ids(["Ġyes", "Ġno"])
    model = tiny_model("llama", vocab_size=len(tokenizer))
    assert not model.config.tie_word_embeddings  # editing lm_head leaves the embeddings alone
    policy = random_policy("slim", model)
    finals = []  # (d,) inputs of lm_head at the last position: the final-norm states the judge's token is read from
    hook = model.lm_head.register_forward_pre_hook(lambda mod, args: finals.append(args[0][0, -1].clone()))
    with torch.no_grad():
        for prompt in _prompts():
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            model(ids)
            with policy.attach(model):
                model(ids)
    hook.remove()
    mean = torch.stack(finals).mean(0)  # (d,)
    # Rows along the mean state lift both tokens ~8 nats over the rest; their random parts set P(" yes") per prompt.
    g = torch.Generator().manual_seed(2)
    for token in (yes, no):
        model.lm_head.weight[token] = 8 * mean / mean.dot(mean) + 0.15 * torch.randn(mean.shape, generator=g)
    model.generation_config.eos_token_id = None
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    policy.save(root / "slim")
    return root, model, tokenizer, (yes, no)


def expected_p_yes(model, tokenizer, yes: int, policy=None) -> list[float]:
    """P(" yes") of each judge prompt computed in-process: the next-token softmax of the (edited) model, 0 when
    " yes" is not among the 2 most likely tokens (TruthfulQA's rule for logprobs=2)."""
    out = []
    with torch.no_grad():
        for prompt in _prompts():
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])  # (1, seq), as the server encodes a prompt
            if policy is None:
                logits = model(ids).logits[0, -1]
            else:
                with policy.attach(model):  # the edit at the last position of the forward call, as the engine
                    logits = model(ids).logits[0, -1]
            logp = torch.log_softmax(logits.double(), dim=-1)  # (vocab,)
            out.append(float(logp[yes].exp()) if yes in logp.topk(2).indices.tolist() else 0.0)
    return out


def start_server(root, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "slim.serve", "--model_dir", str(root / "model"), "--device", "cpu",
           "--policy", f"slim={root / 'slim'}", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SLIM_API_KEY": KEY}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    for _ in range(600):  # the model loads first
        if proc.poll() is not None:
            pytest.fail(proc.stdout.read()[-3000:])
        try:
            client.models.list()
            return proc
        except openai.APIConnectionError:
            time.sleep(0.2)
    proc.terminate()
    pytest.fail("the server did not answer within 120 s: " + proc.communicate(timeout=30)[0][-3000:])


def test_the_openai_judge_scores_against_the_server(saved, tmp_path, monkeypatch):
    root, model, tokenizer, (yes, no) = saved
    policy = Policy.load(root / "slim")
    want_base = expected_p_yes(model, tokenizer, yes)
    want_slim = expected_p_yes(model, tokenizer, yes, policy)
    # The model is built so that these numbers test something: " yes" in the top 2, P(" yes") neither 0 nor 1,
    # different from prompt to prompt and moved by the policy.
    assert all(0.05 < p < 0.95 for p in want_base + want_slim)
    assert max(want_base) - min(want_base) > 0.02 and max(want_slim) - min(want_slim) > 0.02
    assert max(abs(a - b) for a, b in zip(want_base, want_slim)) > 0.1

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    questions, answers = [q for q, _ in QA], [a for _, a in QA]
    cache = tmp_path / "verdicts"
    proc = start_server(root, port)
    try:
        # What a user types: --judge_name openai:<served name>, the served name being the model folder's.
        judges = {name: make_judge(f"openai:{name}", "truth", cache_dir=cache, max_retries=0, timeout=120)
                  for name in ("model", "model+slim")}  # fmt: skip
        assert judges["model"].identity == f"openai:model@127.0.0.1:{port}"
        got_base = judges["model"].score(questions, answers)
        got_slim = judges["model+slim"].score(questions, answers)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert KEY not in out  # the key is never logged
    assert got_base.tolist() == pytest.approx(want_base, abs=1e-5)
    assert got_slim.tolist() == pytest.approx(want_slim, abs=1e-5)
    assert [j.n_requests for j in judges.values()] == [1, 1]  # the four prompts in one request each

    # The server is gone: the same judges, and new ones on the same cache folder, answer from their verdict caches.
    for name, got in (("model", got_base), ("model+slim", got_slim)):
        again = make_judge(f"openai:{name}", "truth", cache_dir=cache, max_retries=0, timeout=5)
        assert judges[name].score(questions, answers).tolist() == got.tolist()
        assert again.score(questions, answers).tolist() == got.tolist()
        assert judges[name].n_requests == 1 and again.n_requests == 0
    with pytest.raises(JudgeUnavailableError, match="after 1 attempts"):  # an answer not cached needs the server
        judges["model"].score([questions[0]], ["London."])

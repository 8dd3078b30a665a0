"""python -m slim.serve as a process: a policy of another model refused in one line; the server on loopback
answering the official openai client (completions, streaming)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from conftest import REPO, make_tokenizer, random_policy, tiny_model
from slim.answering.decoding import greedy_answer_tokens
from slim.policies.base import Policy

PROMPT = "Q: What is the capital of France ? A:"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model, tokenizer = tiny_model("llama"), make_tokenizer()
    model.generation_config.eos_token_id = None
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    random_policy("slim", model).save(root / "slim")
    random_policy("iti", tiny_model("gpt2")).save(root / "other")
    return root, model, tokenizer


def serve_cmd(root, *extra):
    return [sys.executable, "-m", "slim.serve", "--model_dir", str(root / "model"), "--device", "cpu", *extra]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_a_policy_of_another_model_is_refused_in_one_line(saved):
    root = saved[0]
    proc = subprocess.run(serve_cmd(root, "--policy", f"other={root / 'other'}"), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--policy" in errors[0] and "other=" in errors[0] and "fit it again" in errors[0]
    assert "Traceback" not in proc.stderr


def test_the_openai_client_against_the_server(saved):

    root, model, tokenizer = saved
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(serve_cmd(root, "--policy", f"slim={root / 'slim'}", "--port", str(port)), cwd=REPO,
                            env={**env(), "SLIM_API_KEY": "k3y"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", max_retries=0, timeout=60)
        for _ in range(600):  # the model loads first
            if proc.poll() is not None:
                pytest.fail(proc.stdout.read()[-3000:])
            try:
                ids = [m.id for m in client.models.list()]
                break
            except openai.APIConnectionError:
                time.sleep(0.2)
        assert ids == ["model", "model+slim"]
        policy = Policy.load(root / "slim")
        want = greedy_answer_tokens(model, tokenizer, [PROMPT], 6, edit=policy, stop_at_answer=False)[0]
        reply = client.completions.create(model="model+slim", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1)
        assert reply.choices[0].text == tokenizer.decode(want)
        assert reply.usage.completion_tokens == 6 and len(reply.choices[0].logprobs.tokens) == 6
        stream = client.completions.create(model="model+slim", prompt=PROMPT, max_tokens=6, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == tokenizer.decode(want)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="model+nope", prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "k3y" not in out  # the key is never logged


def health_when_idle(client, deadline_s=60.0) -> dict:
    """/health once no row runs (the server frees rows between two decoding steps)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        health = client.get("/health").json()
        if health["running"] == 0 and health["queued"] == 0:
            return health
        time.sleep(0.05)
    pytest.fail(f"rows still running after {deadline_s} s: {health}")


def test_a_client_that_goes_away_frees_its_rows(tmp_path):
    """A reply of 4,000 tokens asked, the client gone after its first bytes (streamed) or half a second (not
    streamed): the server stops decoding those rows, none of them finishes."""
    model, tokenizer = tiny_model("llama", max_positions=8192), make_tokenizer()
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(serve_cmd(tmp_path, "--port", str(port), "--max_tokens", "8000"), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    body = {"model": "model", "prompt": PROMPT, "max_tokens": 4000, "temperature": 0}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for _ in range(600):
                if proc.poll() is not None:
                    pytest.fail(proc.stdout.read()[-3000:])
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
                client.post("/v1/completions", json=body, timeout=0.5)
            health = health_when_idle(client)
            assert (health["cancelled"], health["finished"]) == (1, 0)
            with client.stream("POST", "/v1/completions", json={**body, "stream": True, "n": 2}) as reply:
                first = next(reply.iter_lines())
                assert first.startswith("data: ") and json.loads(first[6:])["choices"]
            health = health_when_idle(client)
            assert (health["cancelled"], health["finished"]) == (3, 0)
            reply = client.post("/v1/completions", json={**body, "max_tokens": 3})  # the server goes on
            assert reply.status_code == 200 and health_when_idle(client)["finished"] == 1
    finally:
        proc.terminate()
        proc.communicate(timeout=30)

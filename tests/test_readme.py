"""The README's Python example runs as written, on a tiny model and a policy fitted for it; the documentation's API
page lists the whole public API."""

import json
import re

import numpy as np

import slim
from conftest import REPO, make_tokenizer, tiny_model
from slim.config import SlimConfig
from slim.policies.base import model_fingerprint
from slim.policies.fit import fit_slim


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Using a fitted policy in your own code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, capsys):
    model, tokenizer = tiny_model("llama", vocab_size=len(make_tokenizer())), make_tokenizer()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((200, 4, 8))  # (N, H, d) of the tiny Llama's layer 1
    weight = rng.standard_normal((4, 8))
    policy = fit_slim(
        acts, weight, np.zeros(4), layer=1, tau=1, cfg=SlimConfig(kappa=40.0), fingerprint=model_fingerprint(model)
    )
    policy.save(tmp_path / "policy")

    code = readme_example()
    assert re.search(r'^MODEL = ".*"', code, re.M) and re.search(r'^POLICY = ".*"', code, re.M)
    code = re.sub(r'^MODEL = ".*"', f'MODEL = "{tmp_path / "tiny"}"', code, flags=re.M)
    code = re.sub(r'^POLICY = ".*"', f'POLICY = "{tmp_path / "policy"}"', code, flags=re.M)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["out"].shape[1] > ns["batch"]["input_ids"].shape[1]  # it generated, with the policy attached
    assert isinstance(ns["policy"], slim.SlimPolicy) and ns["policy"].kappa == 40.0
    assert capsys.readouterr().out.endswith("\n")  # and printed the answer


def test_public_api_is_listed():
    """Every name of slim.__all__ is on the API reference page (docs/api/index.md), in backticks."""
    api_page = (REPO / "docs" / "api" / "index.md").read_text()
    missing = [name for name in slim.__all__ if f"`{name}`" not in api_page]
    assert not missing, f"public names missing from docs/api/index.md: {missing}"
    assert all(hasattr(slim, name) for name in slim.__all__)


def test_readme_serving_example_runs(tmp_path):
    """The README's serving commands and client code, against a tiny model and policy served on loopback."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from conftest import random_policy

    model, tokenizer = tiny_model("llama", vocab_size=len(make_tokenizer())), make_tokenizer()
    model.save_pretrained(tmp_path / "smollm2_135M")
    tokenizer.save_pretrained(tmp_path / "smollm2_135M")
    random_policy("slim", model).save(tmp_path / "policy")
    text = (REPO / "README.md").read_text().split("## Serving a steered model", 1)[1]
    shell = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    serve, curl = shell.split(" &\n", 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = serve.replace("python -m slim.serve smollm2_135M", f"{sys.executable} -m slim.serve smollm2_135M "
                          f"--model_dir {tmp_path / 'smollm2_135M'} --device cpu --port {port}")  # fmt: skip
    serve = re.sub(r"=validation/\S+", f"={tmp_path / 'policy'}", serve)
    proc = subprocess.Popen(serve, shell=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        for _ in range(600):
            try:
                httpx.get(f"http://127.0.0.1:{port}/health")
                break
            except httpx.TransportError:
                assert proc.poll() is None, "the server stopped"
                time.sleep(0.2)
        out = subprocess.run(curl.replace(":8000", f":{port}"), shell=True, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout)["choices"][0]["text"]
        code = re.search(r"```python\n(.*?)```", text, re.S).group(1).replace(":8000", f":{port}")
        ns = {}
        exec(compile(code, "README.md", "exec"), ns)
        assert ns["reply"].choices[0].text and ns["reply"].usage.completion_tokens > 0
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)

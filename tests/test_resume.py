"""kill -9 resume: each long stage, killed part-way, resumes on a rerun and ends with an uninterrupted run's files.

A small script (`STAGES`) runs the five long stages on tiny inputs in a
subprocess: activation extraction (4 batches), probe training (2 folds), map
fitting (3 folds), answering (3 batches) and the OpenAI judge (3 batches,
against a fake completions server in this process). `SLIM_TEST_KILL_AFTER`
(`slim.io.kill_point`) makes the process SIGKILL itself right after a stage's
first durable write. The chain below kills it in each stage in turn, each
rerun resuming where the last one died, then compares every file with those
of one uninterrupted run: byte for byte (every stage is deterministic on the
CPU with one thread, and a resumed stage computes its remaining batches,
folds or maps exactly as the clean run does), except two things compared
without them: the activation manifest's `seconds` and `mtime_ns` (times), and the
order of the metadata entries in a safetensors header, which the safetensors
library writes from a hash map, in an order that changes from one process to
the next; a safetensors file (probes, maps) is therefore compared by its
tensors (dtype, shape and bytes) and its metadata, and its record by its size.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO

STAGE_NAMES = ["activations", "probes", "maps", "answers", "judge"]

STAGES = r"""
import os, sys
from pathlib import Path

sys.path.insert(0, os.environ["TESTS_DIR"])
import numpy as np
import pandas as pd

out = Path(sys.argv[1])

from conftest import make_tokenizer, tiny_model
from slim.data.activations import cached_head_activations

tokenizer, model = make_tokenizer(), tiny_model("llama")
texts = [f"Q: What is {w} ? A: It is {w} ." for w in "Paris London yes no seeds France capital Nothing".split()]
cached_head_activations(model, tokenizer, texts, out / "acts.npy", "tiny", "t", batch_size=2, progress=False)

from slim.config import ProbeConfig
from slim.stage1 import train_fold_probes

rng = np.random.default_rng(0)
acts = rng.standard_normal((60, 2, 3, 4)).astype(np.float16)
labels = rng.integers(0, 2, 60)
for fold, (train, val) in enumerate([(np.arange(40), np.arange(40, 60)), (np.arange(20, 60), np.arange(20))]):
    train_fold_probes(acts, labels, train, val, ProbeConfig(epochs=3), out / f"probes{fold}.safetensors", "f")

from slim.config import SlimConfig
from slim.policies.fit import fit_slim

for fold in range(3):
    rng = np.random.default_rng(10 + fold)
    X, w, b = rng.standard_normal((200, 2, 5)), rng.standard_normal((2, 5)), np.array([1.0, 0.0])
    fit_slim(X, w, b, 0, 1, SlimConfig(0.1, 1.0), maps_path=out / f"maps{fold}.safetensors", maps_key={"fold": fold})

from slim.answering import answer_questions

questions = pd.DataFrame({"question_idx": range(6), "Question": [t.split(" A:")[0][3:] for t in texts[:6]]})
answer_questions(model, tokenizer, questions, out / "answers.csv", batch_size=2, max_new_tokens=6, progress=False)

from slim.judges import OpenAIJudge

answers = pd.read_csv(out / "answers.csv", keep_default_na=False)
judge = OpenAIJudge("judge-model", "truth", cache_path=out / "verdicts.json", batch_size=2, timeout=5)
judge.score(list(answers["question"]), [f"{a} {i}" for i, a in enumerate(answers["answer"])])
print("done")
"""


class Completions:
    """A completions server whose P(yes) depends on the prompt alone; it records the prompts it was asked."""

    def __init__(self):
        self.prompts: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.prompts.extend(body["prompt"])
                choices = [
                    {
                        "index": i,
                        "text": " yes",
                        "finish_reason": "length",
                        "logprobs": {"top_logprobs": [{" yes": math.log((len(p) % 7 + 1) / 9), " no": -2.0}]},
                    }
                    for i, p in enumerate(body["prompt"])
                ]
                data = json.dumps(
                    {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": choices}
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Completions()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def run_stages(script: Path, out: Path, server, kill_after: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLIM_TEST_", "OPENAI_"))}
    env.update(
        TESTS_DIR=str(REPO / "tests"),
        OMP_NUM_THREADS="1",
        OPENAI_API_KEY="sk-dummy-test",
        OPENAI_BASE_URL=server.url,
        SLIM_CACHE=str(out.parent / "cache"),
    )
    if kill_after:
        env["SLIM_TEST_KILL_AFTER"] = kill_after
    return subprocess.run(
        [sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )


def outputs(folder: Path) -> dict[str, object]:
    """The files of a run, as bytes; a safetensors file as its tensors' bytes and its metadata (see the docstring)."""
    from safetensors import safe_open

    files: dict[str, object] = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix != ".lock"}
    manifest = json.loads(files.pop("acts.json"))
    files["acts.json"] = {
        k: v for k, v in manifest.items() if k not in ("seconds", "mtime_ns")
    }  # times differ by nature
    for name in [n for n in files if n.endswith(".safetensors")]:
        with safe_open(str(folder / name), "np") as f:
            files[name] = (
                f.metadata(),
                {k: (str(a.dtype), a.shape, a.tobytes()) for k in f.keys() for a in [f.get_tensor(k)]},
            )
        record = json.loads(files[name + ".sha256.json"])
        files[name + ".sha256.json"] = {k: v for k, v in record.items() if k != "sha256"}
    return files


def test_kill_9_in_each_stage_resumes_to_an_uninterrupted_runs_files(tmp_path, server):
    script = tmp_path / "stages.py"
    script.write_text(STAGES)

    clean = run_stages(script, tmp_path / "clean", server)
    assert clean.returncode == 0 and clean.stdout.strip() == "done", clean.stderr[-2000:]
    asked_clean = list(server.prompts)
    assert len(asked_clean) == 6
    server.prompts.clear()

    resumed = tmp_path / "resumed"
    written: dict[str, set[str]] = {}
    for stage in STAGE_NAMES:
        before = {p.name for p in resumed.iterdir()} if resumed.exists() else set()
        killed = run_stages(script, resumed, server, kill_after=f"{stage}:1")
        assert killed.returncode == -9, (stage, killed.returncode, killed.stderr[-2000:])
        assert "done" not in killed.stdout
        written[stage] = {p.name for p in resumed.iterdir()} - before
        if stage == "activations":  # one batch of two texts of eight extracted
            assert json.loads((resumed / "acts.json").read_text())["rows_done"] == 2
        # killed right after a durable write: no temporary file is left behind
        assert not [p for p in resumed.iterdir() if p.name.endswith(".tmp")], stage
    # each kill came part-way through its stage: what it had written so far, not everything
    assert "probes0.safetensors" in written["probes"] and "probes1.safetensors" not in written["probes"]
    assert "maps0.safetensors" in written["maps"] and "maps2.safetensors" not in written["maps"]
    assert "answers.csv" in written["answers"]
    assert len(server.prompts) == 2  # the judge died after its first batch, its verdicts saved
    assert len(json.loads((resumed / "verdicts.json").read_text())["verdicts"]) == 2

    last = run_stages(script, resumed, server)
    assert last.returncode == 0 and last.stdout.strip() == "done", last.stderr[-2000:]
    assert "warning" not in last.stderr.lower()  # nothing was damaged by the kills
    # no verdict was asked twice: the rerun asked only for the four missing ones
    assert len(server.prompts) == 6 and sorted(server.prompts) == sorted(asked_clean)

    got, want = outputs(resumed), outputs(tmp_path / "clean")
    assert sorted(got) == sorted(want)
    different = [name for name in want if got[name] != want[name]]
    assert not different, different

"""Table 4's timings (slim.paper.timing, timings.py) on tiny data and the tiny random Llama: fast, offline."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, TQA_DIR, make_tokenizer, random_policy, tiny_model
from slim.answering.prompts import qa_prompt
from slim.config import ProbeConfig, SlimConfig
from slim.models.loading import LoadedModel
from slim.paper.overhead import answer_setup, decode_batch, paired_overhead
from slim.paper.table4 import device_description, earlier_table4
from slim.paper.timing import (
    Timing,
    busiest_head,
    repeat_timed,
    time_head_map,
    time_iti_layer,
    time_layer_maps,
    time_layer_probes,
)

N, L, H, D = 120, 3, 4, 8


@pytest.fixture(scope="module")
def acts():
    """Activations (N, L, H, d) float16 as cached, labels with both classes in train and val, a fold's rows."""
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], N // 2)
    x = rng.standard_normal((N, L, H, D)) + 0.5 * labels[:, None, None, None]
    return x.astype(np.float16), labels, np.arange(80), np.arange(80, N)


@pytest.fixture(scope="module")
def lm():
    model = tiny_model("llama", vocab_size=len(make_tokenizer()))
    return LoadedModel(model, make_tokenizer(), "tiny", model.device)


def positive_finite(t: Timing, n: int):
    assert t.n == n and t.unit == "s"
    assert all(math.isfinite(v) and v > 0 for v in t.values)
    assert t.min <= t.median <= t.max


def test_component_timings_are_positive_and_describe_what_ran(acts):
    X, labels, train, val = acts
    t = time_layer_probes(X, labels, train, val, layer=1, cfg=ProbeConfig(epochs=5), repeats=2)
    positive_finite(t, 2)
    assert (t.meta["heads"], t.meta["train_rows"], t.meta["val_rows"], t.meta["epochs"]) == (H, 80, 40, 5)

    acts_layer = X[:, 1].astype(np.float32)
    rng = np.random.default_rng(1)
    weight, bias = rng.standard_normal((H, D)), np.zeros(H)
    head = busiest_head(acts_layer, weight, bias)
    flagged = (np.einsum("nhd,hd->nh", acts_layer, weight) > 0).sum(0)
    assert flagged[head] == flagged.max()
    cfg = SlimConfig(gamma=0.1, kappa=40.0)
    t = time_head_map(acts_layer, weight, bias, head, cfg, repeats=3)
    positive_finite(t, 3)
    assert t.meta["head"] == head and t.meta["flagged_rows"] == flagged[head] and t.meta["status"]
    t = time_layer_maps(acts_layer, weight, bias, cfg, repeats=1)
    positive_finite(t, 1)
    assert t.meta["heads"] == H

    t = time_iti_layer(X, 1 - labels, train, val, layer=2, repeats=1)
    positive_finite(t, 1)
    assert t.meta["heads"] == H and t.meta["layer"] == 2

    with pytest.raises(ValueError, match="repeats"):
        repeat_timed(lambda: None, repeats=0)


def test_overhead_answers_the_same_questions_both_ways_in_alternating_pairs(lm):
    prompts = [qa_prompt(q) for q in ["What is the capital of France ?", "Who was it ?", "Where is Paris ?"]]
    calls = []

    def spy(lm_, batch, edit, *rest):
        calls.append((tuple(batch), edit is None))
        return decode_batch(lm_, batch, edit, *rest)

    policy = random_policy("slim", lm.model, kappa=0.0)  # computes the whole edit, moves nothing
    result = paired_overhead(lm, prompts, policy, batch_size=2, max_new_tokens=3, repeats=2, decode=spy)

    # warm-up: every batch plain, then every batch edited; then 2 repeats x 2 batches of back-to-back pairs
    assert len(calls) == 2 * 2 + 2 * 2 * 2
    plain = sorted(b for b, is_plain in calls if is_plain)
    edited = sorted(b for b, is_plain in calls if not is_plain)
    assert plain == edited and sorted(p for b in plain for p in b) == sorted(prompts * 3)
    pairs = [calls[i : i + 2] for i in range(4, len(calls), 2)]
    assert all(a[0] == b[0] and a[1] != b[1] for a, b in pairs)  # one batch, once each way
    assert [a[1] for a, _ in pairs] == [True, False, False, True]  # plain first, alternating by round and batch

    assert result.prompts == prompts and len(result.plain) == len(result.edited) == 3
    assert result.same == 3  # kappa 0: the same continuations
    assert len(result.pairs) == 4 and all(p["plain_tokens"] > 0 and p["edited_tokens"] > 0 for p in result.pairs)
    for t in (result.per_token, result.per_answer, result.inside_edit):
        assert t.unit == "%" and t.n == 4 and all(math.isfinite(v) for v in t.values)
    assert all(p["inside_calls"] > 0 and 0 < p["inside_s"] < p["edited_s"] for p in result.pairs)
    assert "edit" not in vars(policy)  # the clock around the edit is removed afterwards
    assert result.firing_rate == 1.0  # tau 0: fires everywhere

    # the pipeline's path: shared-prompt cache and stop at the answer, rows leaving the batch
    prefix, stop = answer_setup(lm, pd.DataFrame({"Question": ["Where is Paris ?"]}))
    result = paired_overhead(lm, prompts, policy, 3, 3, 1, prefix=prefix, stop_at_answer=stop)
    assert len(result.pairs) == 1 and result.same == 3


def test_device_description_names_the_hardware():
    text = device_description("cpu")
    assert text.startswith("CPU: ") and "torch threads: " in text


def test_timings_script_writes_the_table_and_its_json(tmp_path):
    model_dir = tmp_path / "tiny_llama"
    tiny_model("llama", vocab_size=len(make_tokenizer())).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "paper" / "table4_tiny.md"
    cmd = [
        sys.executable,
        "timings.py",
        "llama_7B",
        "--model_dir",
        str(model_dir),
        "--device",
        "cpu",
        "--num_fold",
        "2",
        "--n_questions",
        "40",
        "--out_dir",
        str(tmp_path / "validation"),
        "--epochs",
        "5",
        "--max_new_tokens",
        "4",
        "--kappa",
        "40",
        "--repeats",
        "1",
        "--n_questions_timed",
        "4",
        "--answer_batch_size",
        "2",
        "--out",
        str(out),
    ]
    env = {**os.environ, "SLIM_TQA_DIR": str(TQA_DIR), "OMP_NUM_THREADS": "1", "SLIM_NO_WAIT": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    md, record = out.read_text(), json.loads(out.with_suffix(".json").read_text())
    keys = ["probe_layer", "head_map", "inference_per_token", "inference_per_answer", "layer_maps", "iti_layer"]
    assert [c["key"] for c in record["components"]][: len(keys)] == keys
    for c in record["components"]:
        assert c["component"] in md and c["n"] >= 1 and all(math.isfinite(v) for v in c["values"])
        if c["unit"] == "s":
            assert c["median"] > 0
    assert record["components"][2]["n"] == 2  # 4 questions in batches of 2, 1 repeat: 2 pairs
    paper = {c["key"]: c["paper"] for c in record["components"]}
    assert (paper["probe_layer"], paper["head_map"], paper["inference_per_token"]) == (15.64, 52.33, 3.09)
    for field in ("command", "date", "model", "device", "torch"):
        assert field in record["header"] and f"- {field}: " in md
    assert "timings.py" in record["header"]["command"] and "CPU: " in record["header"]["device"]
    assert "the paper's figures, not this run" in md and "| 15.64 |" in md and "| 3.09 |" in md
    assert record["details"]["overhead"]["questions"] == 4 and "table:" in res.stdout

    # a rerun keeps the table (same command, configuration, device, torch); --remeasure or another setting times again
    mtime = out.stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "Table 4 kept: " in again.stdout and out.stat().st_mtime_ns == mtime
    assert earlier_table4(out, record["header"]["command"], record["header"]["device"], record["details"]["config"])
    config = {**record["details"]["config"], "slim": {**record["details"]["config"]["slim"], "kappa": 5.0}}
    assert earlier_table4(out, record["header"]["command"], record["header"]["device"], config) is None
    assert earlier_table4(out, record["header"]["command"], "GPU: another", record["details"]["config"]) is None
    out.with_suffix(".json").write_text("{damaged")
    assert (
        earlier_table4(out, record["header"]["command"], record["header"]["device"], record["details"]["config"])
        is None
    )
    out.with_suffix(".json").write_text(json.dumps(record))
    timed = subprocess.run([*cmd, "--remeasure"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert timed.returncode == 0 and "Table 4 kept" not in timed.stdout and "table:" in timed.stdout
    assert out.stat().st_mtime_ns != mtime

    # a bad count stops in one line naming the flag, before any data or model is touched
    bad = subprocess.run(
        [sys.executable, "timings.py", "--repeats", "0", "--out_dir", str(tmp_path / "none")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --repeats must be an integer")
    assert not (tmp_path / "none").exists()

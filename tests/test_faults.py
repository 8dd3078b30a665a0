"""Bad input and damaged files: each case heals with one warning line or stops with one error line.

Tiny random models, a few seconds a test. The README's "Bad input and faults"
table names the test behind each of its rows.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, TQA_DIR, make_tokenizer, tiny_model
from slim.config import ProbeConfig, SlimConfig
from slim.data.activations import cached_head_activations, load_cached_activations
from slim.data.truthfulqa import DataUnavailableError, load_truthfulqa
from slim.evaluation.metrics import read_summary, write_summary
from slim.io import DamagedArtefact, check_path, verify, write_checked
from slim.judges import EmbeddingStore, OfflineJudge, OpenAIJudge, load_judge_data
from slim.layout import RunLayout
from slim.policies.fit import fit_slim, iti_for_fold
from slim.stage1.probes import load_probes, save_probes

TEXTS = [f"Q: What is {w} ? A: It is {w} ." for w in ("Paris", "London", "the capital", "yes", "no", "a seed")]


def damage(path, how="cut"):
    """Cut a file to half its size, or overwrite 4 bytes in its middle (same size, other content)."""
    size = os.path.getsize(path)
    if how == "cut":
        os.truncate(path, size // 2)
    else:
        with open(path, "r+b") as f:
            f.seek(size // 2)
            old = f.read(4)
            f.seek(size // 2)
            f.write(bytes(b ^ 0xFF for b in old))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------------
# caches and derived artefacts: rebuilt with one warning naming the file


@pytest.mark.parametrize("how", ["cut", "flip"])
def test_damaged_activation_cache_is_extracted_again(tmp_path, tokenizer, caplog, how):
    model, path = tiny_model("llama"), tmp_path / "acts.npy"
    first = np.array(cached_head_activations(model, tokenizer, TEXTS, path, "tiny", "t", progress=False))
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["bytes"] == os.path.getsize(path) and len(manifest["sha256"]) == 64
    damage(path, how)
    again = cached_head_activations(model, tokenizer, TEXTS, path, "tiny", "t", progress=False)
    (line,) = warnings_of(caplog)
    assert f"activation cache {path} is damaged" in line and line.endswith("extracting it again.")
    np.testing.assert_array_equal(np.array(again), first)


def test_cache_written_before_records_is_kept_and_gets_one(tmp_path, tokenizer, caplog):
    model, path = tiny_model("llama"), tmp_path / "acts.npy"
    first = np.array(cached_head_activations(model, tokenizer, TEXTS, path, "tiny", "t", progress=False))
    manifest_path = path.with_suffix(".json")
    old = {k: v for k, v in json.loads(manifest_path.read_text()).items() if k not in ("bytes", "sha256")}
    manifest_path.write_text(json.dumps(old))  # as written before this change
    mtime = path.stat().st_mtime_ns
    kept = load_cached_activations(TEXTS, path, "tiny", "t")  # read back with no model at hand
    np.testing.assert_array_equal(np.array(kept), first)
    assert path.stat().st_mtime_ns == mtime and not warnings_of(caplog)
    assert len(json.loads(manifest_path.read_text())["sha256"]) == 64  # later damage is caught
    os.truncate(path, 1000)  # and an old cache cut short is told by its own .npy header
    manifest_path.write_text(json.dumps(old))
    np.testing.assert_array_equal(
        np.array(cached_head_activations(model, tokenizer, TEXTS, path, "tiny", "t", progress=False)), first
    )
    assert "1000 bytes" in warnings_of(caplog)[0]


def probe_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(3, 2, 4, generator=gen), torch.randn(3, 2, generator=gen), torch.tensor([0, 1, 1]))
    path = tmp_path / "probes.safetensors"
    save_probes(path, *args, meta={"layer": 2})
    return path, args


@pytest.mark.parametrize("how", ["cut", "flip", "garbage", "no record"])
def test_damaged_probes_raise_one_line_naming_the_file(tmp_path, how):
    path, (weight, _, _) = probe_file(tmp_path)
    if how == "garbage":  # overwritten, record and all: the header no longer parses
        path.write_bytes(b"\x00" * 100)
        check_path(path).unlink()
    elif how == "no record":  # a file from before records: accepted as long as it parses
        check_path(path).unlink()
        assert torch.equal(load_probes(path)[0], weight)
        damage(path, "cut")
    else:
        damage(path, how)
    with pytest.raises(DamagedArtefact) as info:
        load_probes(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path} is damaged (") and "train the probes again" in message


def test_damaged_probes_are_trained_again_and_the_intact_fold_is_kept(tmp_path, caplog):
    from slim.config import ProbeConfig
    from slim.stage1.fit import train_fold_probes

    rng = np.random.default_rng(0)
    acts = rng.standard_normal((60, 2, 3, 4)).astype(np.float16)
    labels = rng.integers(0, 2, 60)
    cfg = ProbeConfig(epochs=3)
    paths = [tmp_path / f"fold{k}.safetensors" for k in (0, 1)]
    fits = [train_fold_probes(acts, labels, np.arange(40), np.arange(40, 60), cfg, p, "f") for p in paths]
    mtime = paths[1].stat().st_mtime_ns
    damage(paths[0], "flip")
    again = [train_fold_probes(acts, labels, np.arange(40), np.arange(40, 60), cfg, p, "f") for p in paths]
    (line,) = warnings_of(caplog)
    assert line.startswith(f"{paths[0]} is damaged (") and line.endswith("training the probes again.")
    np.testing.assert_array_equal(again[0].weight, fits[0].weight)
    assert paths[1].stat().st_mtime_ns == mtime  # the intact fold was read back, not retrained
    verify(paths[0])  # the rewritten file matches its new record


def test_damaged_maps_are_fitted_again(tmp_path, caplog):
    from slim.config import SlimConfig

    rng = np.random.default_rng(1)
    acts, weight, bias = rng.standard_normal((200, 2, 5)), rng.standard_normal((2, 5)), np.array([1.0, 0.0])
    path, key = tmp_path / "maps.safetensors", {"layer": 0}
    first = fit_slim(acts, weight, bias, 0, 1, SlimConfig(0.1, 1.0), maps_path=path, maps_key=key)
    damage(path, "cut")
    again = fit_slim(acts, weight, bias, 0, 1, SlimConfig(0.1, 1.0), maps_path=path, maps_key=key)
    (line,) = warnings_of(caplog)
    assert line.startswith(f"{path} is damaged (") and line.endswith("fitting the maps again.")
    torch.testing.assert_close(again.A, first.A)
    verify(path)


def test_damaged_iti_heads_are_fitted_again(tmp_path, caplog):
    from slim.config import ITIConfig
    from slim.data.activations import ProbeData

    rng = np.random.default_rng(2)
    texts = pd.DataFrame({"question_idx": np.repeat(np.arange(10), 4), "truthful": np.tile([1, 0], 20)})
    texts["label"] = 1 - texts["truthful"]
    data = ProbeData(texts, rng.standard_normal((40, 2, 3, 4)).astype(np.float16), "f")
    split = {"train": np.arange(7), "val": np.arange(7, 10)}
    folder, cfg = tmp_path / "iti", ITIConfig(num_heads=2, alpha=5.0, tuning_dataset="same")
    first = iti_for_fold(data, split, cfg, folder)
    damage(folder / "tensors.safetensors", "flip")
    again = iti_for_fold(data, split, cfg, folder)
    (line,) = warnings_of(caplog)
    assert line.startswith(f"{folder / 'tensors.safetensors'} is damaged (") and "fitting ITI's heads again" in line
    torch.testing.assert_close(again.directions, first.directions)


def test_damaged_offline_judge_is_trained_again(tmp_path, caplog, monkeypatch):
    one = dict(cross_fit=1, answer_labels=False)  # one MLP, trained by hand below
    judge = OfflineJudge("truth", tqa_dir=TQA_DIR, cache_dir=tmp_path, embedder=object(), embedder_name="none", **one)
    rng = np.random.default_rng(3)
    judge.mlp.epochs = 1
    judge.mlp.fit(rng.standard_normal((40, 28)).astype(np.float32), np.arange(40) % 2)
    path = judge.save(tmp_path / "judge.safetensors")
    damage(path, "flip")
    with pytest.raises(DamagedArtefact, match="train the judge again"):
        OfflineJudge("truth", tqa_dir=TQA_DIR, cache_dir=tmp_path, embedder=object(), embedder_name="none", **one).load(
            path
        )

    fresh = OfflineJudge("truth", tqa_dir=TQA_DIR, cache_dir=tmp_path, embedder=object(), embedder_name="none", **one)
    trained = []
    monkeypatch.setattr(fresh, "model_path", lambda: path)
    monkeypatch.setattr(fresh, "training_data", lambda: (["q"], ["a"], np.array([True]), path))
    monkeypatch.setattr(fresh, "fit", lambda *a: trained.append(a) or setattr(fresh, "mlps", judge.mlps) or fresh)
    fresh.ensure_ready()
    (line,) = warnings_of(caplog)
    assert line.startswith(f"{path} is damaged (") and "training the offline truth judge again" in line
    assert trained and verify(path)  # retrained and saved again, with its record


def test_damaged_verdict_cache_is_set_aside_and_embeddings_are_recomputed(tmp_path, caplog):
    verdicts = tmp_path / "verdicts.json"
    verdicts.write_text('{"format": "slim-openai-judge-cache/1", "verdicts": {"ab')  # cut short
    judge = OpenAIJudge("ft:x", "truth", cache_path=verdicts)
    assert judge._verdicts == {} and not verdicts.exists()
    assert (tmp_path / "verdicts.json.damaged").read_text().endswith('{"ab')  # kept for a look
    (line,) = warnings_of(caplog)
    assert line.startswith(f"judge cache {verdicts} is damaged (") and "asked again" in line

    class Embedder:
        calls = 0

        def encode(self, texts):
            Embedder.calls += 1
            return np.ones((len(texts), 3), dtype=np.float32)

    store_path = tmp_path / "embeddings.npz"
    EmbeddingStore("e", store_path, Embedder()).encode(["a", "b", "c"])
    for how in ("cut", "flip"):
        damage(store_path, how)
        store = EmbeddingStore("e", store_path, Embedder())
        assert store._vectors == {}
        assert store.encode(["a"]).shape == (1, 3)
    lines = warnings_of(caplog)[1:]
    assert len(lines) == 2 and all(
        line.startswith(f"{store_path} is damaged (") and "embedded again" in line for line in lines
    )


def test_damaged_converted_model_is_converted_again(tmp_path, monkeypatch, caplog):
    from slim.models import loading as models

    monkeypatch.setenv("SLIM_CACHE", str(tmp_path))
    converted = []

    def convert(gguf, out_dir):  # stands in for the 90 s dequantisation: a tiny model, recorded like the real one
        from slim.io import atomic_dir, file_record

        with atomic_dir(out_dir) as tmp:
            tiny_model("llama").save_pretrained(tmp)
            files = {p.name: file_record(p) for p in tmp.iterdir()}
            (tmp / models.SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf), "files": files}))
        converted.append(out_dir)

    monkeypatch.setattr(models, "convert_gguf", convert)
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "x.gguf")
    folder = models.local_model_dir("smollm2_135M")
    assert len(converted) == 1 and models.local_model_dir("smollm2_135M") == folder and len(converted) == 1
    damage(f"{folder}/model.safetensors", "flip")
    models.local_model_dir("smollm2_135M")
    (line,) = warnings_of(caplog)
    assert len(converted) == 2 and f"converted model {folder} is damaged (model.safetensors:" in line


# ---------------------------------------------------------------------------------------------
# artefacts that cannot be rebuilt here: one error line naming the file and what to do


def test_damaged_policy_folder_is_one_line_naming_the_file(tmp_path):
    from slim.policies.base import Policy
    from slim.policies.iti import ITIPolicy

    folder = ITIPolicy([[0, 1]], [[1.0, 0.0]], [0.5], alpha=2.0).save(tmp_path / "policy")
    assert Policy.load(folder).alpha == 2.0
    damage(folder / "tensors.safetensors", "flip")
    with pytest.raises(DamagedArtefact) as info:
        Policy.load(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{folder / 'tensors.safetensors'} is damaged (")
    assert "fit the policy again" in message
    (folder / "policy.json").write_text('{"kind": "iti", "par')
    with pytest.raises(DamagedArtefact, match="policy.json is damaged"):
        Policy.load(folder)


def test_damaged_summary_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "s.json"
    rows = [{"method": "slim", "fold": 0, "true": 1.0}, {"method": "slim", "fold": "mean", "true": 1.0}]
    write_summary(rows, json_path=path)
    assert read_summary(path)[1]["true"] == 1.0
    text = path.read_text()
    path.write_text(text.replace('"true": 1.0', '"true": 9.0'))  # same size, edited
    with pytest.raises(DamagedArtefact, match="sha256 differs.*rerun the evaluation"):
        read_summary(path)
    check_path(path).unlink()  # a summary from before records: a cut-short one fails to parse
    path.write_text(text[:40])
    with pytest.raises(DamagedArtefact, match=f"{path} is damaged \\(JSONDecodeError"):
        read_summary(path)
    proc = subprocess.run(
        [sys.executable, "-m", "slim.evaluation.sweep", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and f"error: {path} is damaged" in proc.stderr


def test_damaged_best_choice_is_one_line(tmp_path):
    import slim_utils as su
    from slim.layout import RunLayout

    layout = RunLayout(tmp_path, "tiny")
    layout.best("slim").write_text('{"param": "kappa", "val')
    with pytest.raises(DamagedArtefact, match="run sweep.sh \\(METHOD=slim\\) again"):
        su.knob("best", layout, "slim", "kappa")


def test_truncated_truthfulqa_names_the_file_and_what_to_do(tmp_path, caplog):
    text = (TQA_DIR / "TruthfulQA.csv").read_text()
    csv = tmp_path / "TruthfulQA.csv"
    csv.write_text(text[: text.index('"', 5000) + 3])  # cut inside a quoted field
    with pytest.raises(DataUnavailableError) as info:
        load_truthfulqa(tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{csv} is damaged (ParserError")
    assert "delete it to download it again" in message and "SLIM_TQA_DIR" in message
    csv.write_text(text[: text.index("\n", 5000) + 1])  # cut at a line end: parses, with fewer questions
    assert len(load_truthfulqa(tmp_path)) < 817
    (line,) = warnings_of(caplog)
    assert line.startswith(f"{csv} differs from the published TruthfulQA.csv")
    for name in ("finetune_truth.jsonl", "finetune_info.jsonl"):
        shutil.copy(TQA_DIR / name, tmp_path / name)
    with open(tmp_path / "finetune_truth.jsonl", "a") as f:
        f.write('{"prompt": "Q: cut')
    with pytest.raises(DataUnavailableError, match="finetune_truth.jsonl is damaged \\(JSONDecodeError"):
        load_judge_data("truth", tmp_path)


def test_checked_write_records_and_verify_tells_damage(tmp_path, monkeypatch):
    path = write_checked(tmp_path / "f.bin", lambda tmp: open(tmp, "wb").write(b"x" * 100))
    assert json.loads(check_path(path).read_text())["bytes"] == 100 and verify(path)
    # killed after the new record is written but before the new file replaces the old one: no false alarm
    real_replace = os.replace

    def killed(src, dst):  # the record's own replace goes through, the file's is "killed"
        if not str(dst).endswith(".sha256.json"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            write_checked(path, lambda tmp: open(tmp, "wb").write(b"y" * 50))
    assert json.loads(check_path(path).read_text())["bytes"] == 50 and path.read_bytes() == b"x" * 100
    assert verify(path)
    path.write_bytes(b"x" * 99)
    with pytest.raises(DamagedArtefact, match="99 bytes, 50 written"):
        verify(path)


# ---------------------------------------------------------------------------------------------
# through the scripts: what the user sees


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults") / "tiny_llama"
    tiny_model("llama", vocab_size=len(make_tokenizer())).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def script(args, out_dir, env=None, **kw):
    device = [] if "--device" in args else ["--device", "cpu"]
    cmd = [sys.executable, *args, *device, "--n_questions", "10", "--out_dir", str(out_dir)]
    full_env = {**os.environ, "SLIM_TQA_DIR": str(TQA_DIR), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300, **kw)


def said(stderr: str) -> list[str]:
    """What the run told the user: warning and error lines (progress bars aside), and any traceback."""
    return [l for l in stderr.splitlines() if l.startswith(("warning:", "error:", "Traceback", "  File"))]


def test_scripts_heal_damaged_caches_with_one_warning(model_dir, tmp_path):
    out = tmp_path / "v"
    args = ["choose_edited_layer.py", "--model_dir", str(model_dir), "--epochs", "3", "--no_figures"]
    first = script(args, out)
    assert first.returncode == 0 and said(first.stderr) == [], first.stderr[-2000:]
    cache = out / "features" / "tiny_llama_first10_tqa_mc2_head_wise.npy"
    probes = sorted((out / "probes" / "tiny_llama_first10").glob("fold*.safetensors"))
    damage(cache, "cut")
    damage(probes[0], "flip")
    proc = script(args, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = said(proc.stderr)
    assert len(lines) == 2, proc.stderr[-2000:]
    assert lines[0].startswith(f"warning: activation cache {cache} is damaged (") and "extracting it again" in lines[0]
    assert lines[1].startswith(f"warning: {probes[0]} is damaged (") and "training the probes again" in lines[1]
    assert proc.stdout.splitlines()[:2] == first.stdout.splitlines()[:2]  # the same chosen layers and metrics


def test_scripts_bad_model_dir_embedder_and_warnings_are_one_line(model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = script(["extract_activations.py", "--model_dir", str(empty), "--device", "7"], tmp_path / "v")
    assert proc.returncode == 2 and said(proc.stderr) == [
        "warning: device 7: CUDA is not available here, running on the CPU instead.",
        f"error: --model_dir '{empty}' holds no config.json: point it at a folder written by save_pretrained "
        "(config.json, the weights and the tokenizer files).",
    ], proc.stderr

    for args, line in [
        (["validate_2fold.py", "--num_heads", "0"], "error: --num_heads must be"),
        (["extract_activations.py", "--tqa_dir", str(empty)], f"error: {empty / 'TruthfulQA.csv'} does not exist"),
    ]:
        proc = script([*args, "--model_dir", str(model_dir)], tmp_path / "v")
        assert proc.returncode == 2 and len(said(proc.stderr)) == 1, proc.stderr[-2000:]
        assert said(proc.stderr)[0].startswith(line), proc.stderr[-2000:]

    local = f"local:{model_dir}"
    args = ["validate_2fold.py", "--model_dir", str(model_dir), "--alpha", "0", "--judge_name", local]
    proc = script([*args, "--info_name", local, "--embedder", "no-such-org/no-such-embedder"], tmp_path / "v")
    lines = said(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: embedder 'no-such-org/no-such-embedder' could not be loaded (")
    assert "all-MiniLM-L6-v2 (available offline)" in lines[0]

    code = "import warnings, slim_utils as su; su.run_main(lambda: warnings.warn('two\\nlines'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stderr == "warning: UserWarning: two lines\n"


@contextlib.contextmanager
def held_by_another_run(artefact, holder: str):
    """The lock of `artefact` (slim.io.artefact_lock's `.<name>.lock` beside it) held as another run would."""
    artefact.parent.mkdir(parents=True, exist_ok=True)
    with open(artefact.with_name(f".{artefact.name}.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"{holder}\n")
        lock.flush()
        yield


def test_a_second_run_wanting_the_same_artefact_waits_or_says_who_holds_it(model_dir, tmp_path):
    first, out = tmp_path / "first", tmp_path / "v"
    args = ["choose_edited_layer.py", "--model_dir", str(model_dir), "--epochs", "3", "--no_figures"]
    assert script(args, first).returncode == 0  # the probes the "first run" below will have written
    probes = RunLayout(out, "tiny_llama", 10).probes(0, "tqa_mc2", ProbeConfig(epochs=3))
    with held_by_another_run(probes, "pid 1 (choose_edited_layer.py --epochs 3) since today"):
        proc = script(args, out, env={"SLIM_NO_WAIT": "1"})
        assert proc.returncode == 2 and said(proc.stderr) == [
            f"error: {probes} is being written by pid 1 (choose_edited_layer.py --epochs 3) since today: wait for it "
            "to finish or pass another --out_dir."
        ]
        assert (out / "features" / "tiny_llama_first10_tqa_mc2_head_wise.npy").exists()  # what it did is kept
        cmd = [sys.executable, *args, "--device", "cpu", "--n_questions", "10", "--out_dir", str(out)]
        env = {**os.environ, "SLIM_TQA_DIR": str(TQA_DIR), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        second = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        while not any("waiting for it" in line for line in lines) and len(lines) < 50:
            lines.append(second.stderr.readline())
        assert lines[-1].startswith(f"{probes} is being written by pid 1 (choose_edited_layer.py"), lines
        time.sleep(0.5)
        assert second.poll() is None and not probes.exists()  # it waits: the probes are not trained twice
        for f in (first / "probes" / "tiny_llama_first10").glob(f"{probes.name}*"):  # the first run writes them
            shutil.copy2(f, probes.parent / f.name)
        written = probes.stat().st_mtime_ns
    stdout, stderr = second.communicate(timeout=300)  # the first run ended: the second goes on and reads them
    assert second.returncode == 0 and "chosen layer" in stdout, stderr[-2000:]
    assert probes.stat().st_mtime_ns == written  # read back, not trained again
    assert len(list(probes.parent.glob("fold1_*.safetensors"))) == 1  # the other fold: trained by this run


def test_runs_of_other_sweep_points_on_one_out_dir_go_on_at_once(model_dir, tmp_path):
    out = tmp_path / "v"
    stage1 = script(["choose_edited_layer.py", "--model_dir", str(model_dir), "--epochs", "3", "--no_figures"], out)
    assert stage1.returncode == 0, stage1.stderr[-2000:]
    chosen = json.loads(next(out.glob("tiny_llama_first10_chosen_layer_*.json")).read_text())["chosen_layer"]
    kappa40 = RunLayout(out, "tiny_llama", 10).slim_policy(0, chosen["0"], SlimConfig(0.1, 40.0), ProbeConfig(epochs=3))
    local = f"local:{model_dir}"
    point = ["ot_edit_layer.py", "--model_dir", str(model_dir), "--epochs", "3", "--use_mode", "val"]
    point += ["--judge_name", local, "--info_name", local, "--max_questions", "2", "--max_new_tokens", "3"]
    with held_by_another_run(kappa40, "pid 1 (ot_edit_layer.py --kappa 40) since today"):
        same = script([*point, "--kappa", "40"], out, env={"SLIM_NO_WAIT": "1"})
        assert same.returncode == 2 and said(same.stderr)[-1:] == [
            f"error: {kappa40} is being written by pid 1 (ot_edit_layer.py --kappa 40) since today: wait for it to "
            "finish or pass another --out_dir."
        ], same.stderr[-2000:]
        # a kappa 40 run in flight, waiting for that policy; meanwhile a kappa 10 run on the same folder goes on
        waiting = subprocess.Popen(
            [sys.executable, *point, "--kappa", "40", "--device", "cpu", "--n_questions", "10", "--out_dir", str(out)],
            cwd=REPO,
            env={**os.environ, "SLIM_TQA_DIR": str(TQA_DIR), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = []
        while not any("waiting for it" in line for line in lines) and len(lines) < 50:
            lines.append(waiting.stderr.readline())
        assert lines[-1].startswith(f"{kappa40} is being written by pid 1"), lines
        other = script([*point, "--kappa", "10"], out, env={"SLIM_NO_WAIT": "1"})
        assert other.returncode == 0, other.stderr[-2000:]
        assert list((out / "summary").glob("tiny_llama_first10_slim_kappa10_*_val_max2.json"))
        assert waiting.poll() is None and not list((out / "summary").glob("tiny_llama_first10_slim_kappa40_*"))
    stdout, stderr = waiting.communicate(timeout=300)  # the holder is done: the kappa 40 run goes on
    assert waiting.returncode == 0, stderr[-2000:]
    assert list((out / "summary").glob("tiny_llama_first10_slim_kappa40_*_val_max2.json"))


def test_model_dir_without_tokenizer_or_with_damaged_weights_is_one_line(model_dir, tmp_path):
    from slim.models.loading import load_model

    no_tokenizer, damaged = tmp_path / "no_tokenizer", tmp_path / "damaged"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, no_tokenizer / name)
    shutil.copytree(model_dir, damaged)
    damage(damaged / "model.safetensors", "cut")
    for folder, part in ((no_tokenizer, "tokenizer"), (damaged, "model")):
        with pytest.raises(RuntimeError) as info:
            load_model(model_dir=str(folder), device="cpu")
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"could not load the {part} of '{folder}' (")
        assert "pass --model_dir with a complete local copy" in message

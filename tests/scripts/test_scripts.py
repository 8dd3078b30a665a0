"""The published command lines, end to end, on a tiny random Llama saved to a folder (offline, fast)."""

import functools
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO, TQA_DIR, common, eval_flags, make_tokenizer, run, tiny_model
from slim.config import ParameterError


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = root / "tiny_llama"
    model = tiny_model("llama", vocab_size=len(make_tokenizer()))
    model.save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    return root, model_dir


def test_three_commands_and_sweep(work):
    root, model_dir = work
    out = root / "validation"
    res = run(
        [
            "choose_edited_layer.py",
            "llama_7B",
            *common(root, model_dir),
            "--dataset_name",
            "tqa_mc2",
            "--bl",
            "1.0",
            "--epochs",
            "5",
            "--paper_dir",
            str(root / "paper"),
        ],
        root,
    )
    assert "chosen layer" in res.stdout
    table = pd.read_csv(next(out.glob("tiny_llama_layer_metrics_*.csv")))
    assert sorted(table.fold.unique()) == [0, 1] and len(table) == 2 * 3
    assert {"acc", "f1", "tp", "tn", "fp", "fn", "fpr", "fnr", "tau", "val_loss"} <= set(table.columns)
    assert (root / "paper" / "figure1a_tiny_llama_fnr_fpr_by_layer.png").exists()
    probes = sorted((out / "probes" / "tiny_llama").glob("fold*.safetensors"))
    assert len(probes) == 2
    mtimes = [p.stat().st_mtime for p in probes]

    res = run(
        [
            "ot_edit_layer.py",
            "llama_7B",
            *common(root, model_dir),
            "--bl",
            "1.0",
            "--alpha",
            "0.1",
            "--kappa",
            "40",
            "--use_mode",
            "test",
            "--epochs",
            "5",
            "--mimic",
            "--ce_kl",
            *eval_flags(model_dir),
        ],
        root,
    )
    assert [p.stat().st_mtime for p in probes] == mtimes  # stage 1 was read back, not retrained
    rows = json.loads(next((out / "summary").glob("tiny_llama_slim_*_test_max3.json")).read_text())
    assert [r["fold"] for r in rows] == [0, 1, "mean"]
    assert rows[-1]["method"] == "slim" and rows[-1]["kappa"] == 40.0
    assert (
        rows[0]["judge_id"].startswith("local:tiny_llama@sha256:") and rows[-1]["info_judge_id"] == rows[0]["judge_id"]
    )
    assert rows[0]["ce"] > 0 and rows[0]["kl"] >= 0 and rows[0]["ce_kl_corpus"] == "tqa-best-answers"
    assert list((out / "summary").glob("tiny_llama_mimic_*_test_max3.json"))
    config = json.loads(next((out / "summary").glob("tiny_llama_slim_*_test_max3.config.json")).read_text())
    assert config["slim"]["kappa"] == 40.0 and config["slim"]["gamma"] == 0.1 and config["data"]["seed"] == 42
    assert config["probe"]["epochs"] == 5 and config["eval"]["max_new_tokens"] == 4 and config["slim"]["cov"]
    answers = pd.read_csv(next((out / "answers" / "tiny_llama").glob("slim_*_fold0_test_max3.csv")))
    split = pd.read_csv(next(out.rglob("fold_0_test_seed_42.csv")))  # in the run's question order
    assert sorted(answers["question_idx"]) == sorted(split["question_idx"][:3]) and split["question_order"][0]
    assert list((out / "policies" / "tiny_llama").glob("slim_fold0_*/policy.json"))

    written = root / "written.txt"
    res = run(
        [
            "validate_2fold.py",
            "llama_7B",
            *common(root, model_dir),
            "--num_heads",
            "4",
            "--alpha",
            "15",
            "--use_center_of_mass",
            "--summary_out",
            str(written),
            *eval_flags(model_dir),
        ],
        root,
    )
    iti_summary = out / "summary" / "tiny_llama_iti_alpha15_heads4_dircom_test_max3.json"
    assert "iti" in res.stdout and written.read_text() == f"{iti_summary}\n" and iti_summary.exists()
    run(
        [
            "validate_2fold.py",
            "llama_7B",
            *common(root, model_dir),
            "--alpha",
            "0",
            "--fold",
            "1",
            *eval_flags(model_dir),
        ],
        root,
    )
    rows = json.loads((out / "summary" / "tiny_llama_baseline_test_max3_fold1only.json").read_text())
    assert [r["fold"] for r in rows] == [1, "mean"] and rows[0]["method"] == "baseline"

    # every python the sweep starts goes through a shim that notes its arguments (VIRTUAL_ENV set: PATH kept)
    shim, calls = root / "bin", root / "python_calls.txt"
    shim.mkdir()
    (shim / "python").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexec "{sys.executable}" "$@"\n')
    (shim / "python").chmod(0o755)
    env = {"KAPPAS": "0 5", "MAX_QUESTIONS": "2", "OUT_DIR": str(out), "MODEL": "llama_7B"}
    env.update(PATH=f"{shim}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(root))
    proc = subprocess.run(
        [
            "bash",
            "sweep.sh",
            "--model_dir",
            str(model_dir),
            "--device",
            "cpu",
            "--epochs",
            "5",
            "--judge_name",
            f"local:{model_dir}",
            "--info_name",
            f"local:{model_dir}",
            "--max_new_tokens",
            "4",
        ],
        cwd=REPO,
        env={**os.environ, "SLIM_TQA_DIR": str(TQA_DIR), **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    best = json.loads((out / "tiny_llama_best_slim.json").read_text())
    assert best["param"] == "kappa" and best["value"] in (0.0, 5.0) and len(best["candidates"]) == 2
    assert [r["kappa"] for r in best["candidates"]] == [0.0, 5.0]  # every line of --summary_out, in grid order
    started = calls.read_text().splitlines()  # one process for the whole grid, then the choice
    assert [c.split()[0] for c in started] == ["ot_edit_layer.py", "-m"], started
    assert " --kappa 0 5 " in started[0] and started[1].startswith("-m slim.evaluation.sweep ")


def test_question_subset_keeps_its_own_tables_and_figures(work):
    root, model_dir = work
    run(
        [
            "choose_edited_layer.py",
            "llama_7B",
            *common(root, model_dir),
            "--n_questions",
            "40",
            "--bl",
            "1.0",
            "--epochs",
            "5",
        ],
        root,
    )
    out = root / "validation"
    # no --paper_dir: the figures stay under --out_dir, never in the repository's paper/
    assert [p.name for p in (out / "figures").glob("*.png")] == ["figure1a_tiny_llama_first40_fnr_fpr_by_layer.png"]
    assert not list((REPO / "paper").glob("*tiny_llama*"))
    assert list((out / "probes" / "tiny_llama_first40").glob("fold*.safetensors"))
    assert len(list(out.glob("tiny_llama_first40_layer_metrics_*.csv"))) == 1
    assert len(list(out.glob("tiny_llama_first40_chosen_layer_*.json"))) == 1


def test_bad_input_is_one_line_and_keeps_results(work):
    root, model_dir = work
    for args, message in [
        (["choose_edited_layer.py", "llama_9B"], "unknown model key"),
        (["choose_edited_layer.py", *common(root, model_dir), "--bl", "-1"], "bl must be"),
        (["choose_edited_layer.py", *common(root, model_dir), "--beta", "-0.5"], "beta must be"),
        (["choose_edited_layer.py", *common(root, model_dir), "--epochs", "0"], "epochs must be"),
        (["ot_edit_layer.py", *common(root, model_dir), "--kappa", "-1"], "kappa must be"),
        (["ot_edit_layer.py", *common(root, model_dir), "--alpha", "0.5"], "--alpha (gamma) must lie in (0, 0.5)"),
        (["validate_2fold.py", *common(root, model_dir), "--alpha", "best"], "--alpha best:"),
        (["choose_edited_layer.py", *common(root, model_dir), "--num_fold", "1"], "--num_fold must be"),
        (["choose_edited_layer.py", *common(root, model_dir), "--dataset_name", "x"], "--dataset_name must be one"),
    ]:
        proc = run(args, root, check=False)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error:"), proc.stderr[-2000:]


def outputs(folder):
    """Every file under `folder` (lock files aside), as bytes, by its path below `folder`."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def test_a_kappa_grid_in_one_process_writes_what_single_value_runs_write(work):
    root, model_dir = work
    out = root / "grid"
    point = ["ot_edit_layer.py", "llama_7B", *common(root, model_dir)[:-2], "--out_dir", str(out)]
    point += ["--n_questions", "40", "--epochs", "5", "--use_mode", "val", *eval_flags(model_dir)]
    written = root / "grid_written.txt"
    singles = []
    for kappa in ("5", "40"):  # as sweep.sh ran them before: one process per value
        run([*point, "--kappa", kappa, "--summary_out", str(written)], root)
        singles.append(written.read_text())
    made = ("answers", "summary", "policies")
    want = {name: outputs(out / name) for name in made}
    assert sum(f.endswith(".config.json") for f in want["summary"]) == 2 and len(want["policies"]) == 2 * 2 * 2
    for name in (*made, "maps"):  # the maps too: the grid fits them again, once, for both values
        shutil.rmtree(out / name)

    res = run([*point, "--kappa", "5", "40", "--summary_out", str(written)], root)
    assert written.read_text() == "".join(singles)  # one line per value, in grid order
    assert res.stdout.count("policy saved to") == 2 * 2
    got = {name: outputs(out / name) for name in made}
    for name in made:
        assert sorted(got[name]) == sorted(want[name]), name
        assert [f for f in want[name] if got[name][f] != want[name][f]] == [], name


def test_judge_pair_verify_and_device_flags(monkeypatch):
    import argparse

    import torch

    import slim_utils as su

    parser = su.add_flags(argparse.ArgumentParser(), su.COMMON_FLAGS, su.EVAL_FLAGS)
    args = parser.parse_args(["--judge_name", "allenai"])
    assert su.eval_config(args).info_name == "allenai" and args.verify is False
    args = parser.parse_args(["--judge_name", "allenai", "--info_name", "offline", "--verify"])
    assert su.eval_config(args).info_name == "offline" and args.verify is True
    assert su.eval_config(parser.parse_args([])).info_name == "offline"
    assert su.info_judge_name("allenai", None) == "allenai" and su.info_judge_name("offline", None) is None  # transfer

    # stage 1 under --device auto: the GPU with the most free memory (where auto loads a model that fits), the
    # loaded model's input device if loaded
    args = argparse.Namespace(device="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert su.compute_device(args) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ([5, 9, 9][i] * 2**30, 80 * 2**30))
    assert su.compute_device(args) == "cuda:1"  # the first of the two with the most free memory
    spread = functools.cache(lambda: argparse.Namespace(device=torch.device("cuda", 2)))
    assert su.compute_device(args, spread) == "cuda:1"  # not loaded: no load only to ask
    spread()
    assert su.compute_device(args, spread) == "cuda:2"
    assert su.compute_device(argparse.Namespace(device="cpu"), spread) == "cpu"

    # a GPU index that is not there: one line naming the flag (run_main prints `error: --device ...`)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ParameterError) as err:
        su.data_config(parser.parse_args(["--device", "3"]))
    assert err.value.param == "device" and err.value.requirement.startswith("3: only 1 CUDA device(s) visible here")
    assert "from 0 to 0, or auto" in err.value.requirement

"""A sweep: a grid scored in one process, the knob chosen from its validation summaries and read back (`best`)."""

import importlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import slim_utils as su
from conftest import HashEmbedder, LengthJudge, make_tokenizer, random_policy, tiny_model
from slim.config import EvalConfig, SlimConfig
from slim.evaluation.evaluate import Scorers
from slim.evaluation.sweep import at_knob, evaluate_grid, main, select_best
from slim.layout import RunLayout
from slim.models.loading import LoadedModel
from slim.policies.fit import fit_iti, fit_slim


def summary(path, method, true, info, sem, degeneracy, **knob):
    row = {
        "method": method,
        "model": "m",
        "true": true,
        "info": info,
        "true_info": true * info / 100,
        "sem": sem,
        "degeneracy": degeneracy,
        **knob,
    }
    path.write_text(json.dumps([dict(row, fold=0), dict(row, fold="mean")]))
    return str(path)


def test_unintervened_row_counts_as_alpha_zero_and_is_read_back(tmp_path, capsys):
    files = [
        summary(tmp_path / "base.json", "baseline", 50.0, 80.0, 0.30, 0.0),
        summary(tmp_path / "a5.json", "iti", 55.0, 60.0, 0.40, 0.05, alpha=5.0),
        summary(tmp_path / "a15.json", "iti", 99.0, 99.0, 0.90, 0.90, alpha=15.0),
    ]  # degenerate: excluded
    best = main(["--param", "alpha", "--method", "iti", "--out_dir", str(tmp_path), *files])
    assert best["method"] == "baseline" and best["alpha"] == 0.0  # 40.0 > 33.0; 98.0 is degenerate
    out = capsys.readouterr().out
    assert "None" not in out and "best alpha: 0 " in out
    assert (tmp_path / "m_best_iti.json").exists()
    assert su.knob("best", RunLayout(tmp_path, "m"), "iti", "alpha") == 0.0
    with pytest.raises(ValueError, match="alpha best: .* does not exist"):
        su.knob("best", RunLayout(tmp_path, "m", n_questions=60), "iti", "alpha")


def test_ties_go_to_sem_and_a_foreign_summary_is_refused(tmp_path):
    rows = [
        {"true_info": 30.0, "sem": 0.2, "degeneracy": 0.0, "kappa": 0.0},
        {"true_info": 30.0, "sem": 0.5, "degeneracy": 0.0, "kappa": 40.0},
    ]
    assert select_best(rows)["kappa"] == 40.0
    with pytest.raises(ValueError, match="degeneracy rate above"):
        select_best([dict(rows[0], degeneracy=0.5)])
    other = summary(tmp_path / "iti.json", "iti", 50.0, 50.0, 0.3, 0.0, alpha=5.0)
    with pytest.raises(ValueError, match="has no 'kappa'"):
        main(["--param", "kappa", "--method", "slim", other])


def test_a_policy_at_another_knob_is_the_one_fitted_at_that_value():
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((40, 2, 3, 4)).astype(np.float32)  # (N, L, H, d)
    truthful = np.tile([0, 1], 20)
    train, val = np.arange(30), np.arange(30, 40)
    one, three = (fit_iti(acts, truthful, train, val, num_heads=3, alpha=a) for a in (1.0, 3.0))
    moved = at_knob(one, alpha=3.0)
    assert one.alpha == 1.0 and moved.alpha == 3.0 and moved.digest() == three.digest() != one.digest()
    a = torch.randn(5, 3, 4)  # (n, H, d)
    for layer in three.layers:
        assert torch.equal(moved.move(layer, a), three.move(layer, a))

    X, w, b = rng.standard_normal((200, 2, 5)), rng.standard_normal((2, 5)), np.array([1.0, 0.0])
    slim1, slim5 = (fit_slim(X, w, b, 0, 1, SlimConfig(0.1, k)) for k in (1.0, 5.0))
    at5 = at_knob(slim1, kappa=5.0)
    assert at5.digest() == slim5.digest() and at5.meta == slim5.meta and at5.meta is not slim1.meta
    with pytest.raises(ValueError, match="no knob 'alpha'"):
        at_knob(slim1, alpha=2.0)


def files(folder) -> dict:
    """Every file under `folder` (lock files aside) as bytes, by its path below `folder`."""
    return {
        p.relative_to(folder): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def test_a_grid_scored_in_one_process_writes_what_single_runs_write(tmp_path, monkeypatch):
    ev = importlib.import_module("slim.evaluation.evaluate")  # the module (the package exports a function so named)
    loads = []

    def scorers(*args, **kwargs):  # stand-in judges; counts how often they are loaded
        loads.append(args)
        return Scorers(LengthJudge(), LengthJudge(), HashEmbedder(), ("stub", "stub"), "hash")

    monkeypatch.setattr(ev, "load_scorers", scorers)
    model = tiny_model("llama", max_positions=512)
    lm = LoadedModel(model=model, tokenizer=make_tokenizer(), name="tiny", device=torch.device("cpu"))
    questions = pd.DataFrame(
        {
            "Question": ["What is the capital of France ?", "who was it ?", "where is London ?", "It was yes ?"],
            "Correct Answers": ["Paris; It is Paris"] * 4,
            "Incorrect Answers": ["London; It is London"] * 4,
        }
    )
    folds = [{"test": np.array([0, 1]), "val": np.array([2, 3])}, {"test": np.array([2, 3]), "val": np.array([0, 1])}]
    cfg = EvalConfig(max_new_tokens=5, batch_size=2)
    layout = RunLayout(tmp_path, "tiny")

    def runs():  # kappa 0 (the unintervened answers), SLIM at 5, ITI: each with its own run config
        grid = [("slim", {"kappa": k}, random_policy("slim", model, kappa=k)) for k in (0.0, 5.0)]
        grid.append(("iti", {"alpha": 2.0}, random_policy("iti", model)))
        return [(m, p, {0: pol, 1: pol}, {"run": dict(p)}) for m, p, pol in grid]

    singles = [ev.evaluate_methods(lm, questions, folds, [r[:3]], cfg, layout, r[3])[0] for r in runs()]
    want = files(tmp_path)
    for folder in ("answers", "summary", "policies"):
        shutil.rmtree(tmp_path / folder)
    loads.clear()
    results = evaluate_grid(lm, questions, folds, runs(), cfg, layout)
    assert len(loads) == 1  # the judges and the embedder, once for the whole grid
    assert [r.summary_json for r in results] == [r.summary_json for r in singles]
    got = files(tmp_path)
    assert sorted(got) == sorted(want) and [k for k in want if got[k] != want[k]] == []

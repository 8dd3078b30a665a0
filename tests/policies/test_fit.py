"""Tests of slim.policies.fit's ITI: where sigma (the std of the projections on each direction) comes from.

The published scripts take it from the tqa_gen_end_q texts of all questions (their default activations
dataset); `tuning_dataset` also offers those texts of the fold's train+val questions, or the probe texts'
train+val rows ("same"). Activations come from a tiny random Llama, through the same cache as a run's.
"""

import os
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import WORDS, tiny_model
from slim.config import ITIConfig
from slim.data.activations import load_probe_data
from slim.layout import RunLayout
from slim.policies.base import Policy
from slim.policies.fit import iti_for_fold

SPLIT = {"train": np.arange(6), "val": np.arange(6, 8), "test": np.arange(8, 10)}


def make_questions(n=10, seed=0) -> pd.DataFrame:
    """n questions of the tokenizer's words, each with 2 correct and 2 incorrect answers closed by ' .'."""
    rng = np.random.default_rng(seed)
    words = [w for w in WORDS if w not in ("Q:", "A:", ".", "?")]

    def phrase(k):
        return " ".join(rng.choice(words, k))

    return pd.DataFrame(
        {
            "Question": [f"{phrase(5)} ?" for _ in range(n)],
            "Correct Answers": [[f"{phrase(3)} .", f"{phrase(2)} ."] for _ in range(n)],
            "Incorrect Answers": [[f"{phrase(3)} .", f"{phrase(4)} ."] for _ in range(n)],
        }
    )


@pytest.fixture(scope="module")
def activations(tmp_path_factory, tokenizer):
    """The probe texts' and the tqa_gen_end_q texts' activations, cached under a run layout."""
    layout = RunLayout(tmp_path_factory.mktemp("run"), "tiny")
    model, loads = tiny_model("llama"), []

    def load():
        loads.append(1)
        return SimpleNamespace(model=model, tokenizer=tokenizer, device="cpu")

    df = make_questions()
    data = load_probe_data(df, "tqa_mc2", layout, load, batch_size=8)
    tuning = load_probe_data(df, "tqa_gen_end_q", layout, load, batch_size=8)
    return SimpleNamespace(df=df, layout=layout, data=data, tuning=tuning, load=load, loads=loads)


def projection_std(acts, l, h, vec):
    return float(np.std(np.asarray(acts[:, l, h], dtype=np.float64) @ vec))


def test_gen_end_q_activations_are_one_more_cached_pass(activations):
    a = activations
    assert a.layout.features("tqa_gen_end_q").exists() and len(a.loads) == 2
    assert len(a.tuning.texts) == len(a.data.texts) and a.tuning.activations.shape == a.data.activations.shape
    again = load_probe_data(a.df, "tqa_gen_end_q", a.layout, a.load, batch_size=8)
    assert len(a.loads) == 2  # read back from the cache, no model
    np.testing.assert_array_equal(again.activations, a.tuning.activations)


def test_iti_sigma_from_gen_end_q_of_all_questions_by_hand(activations, tmp_path):
    data, tuning = activations.data, activations.tuning
    cfg = ITIConfig(num_heads=3, alpha=1.0, direction="com")
    assert cfg.tuning_dataset == "tqa_gen_end_q_all"  # the published default
    published = iti_for_fold(data, SPLIT, cfg, tmp_path / "all", tuning=tuning)
    fold = iti_for_fold(data, SPLIT, replace(cfg, tuning_dataset="tqa_gen_end_q"), tmp_path / "fold", tuning=tuning)
    train = iti_for_fold(data, SPLIT, replace(cfg, tuning_dataset="same"), tmp_path / "same")

    # the heads and directions come from the probe texts' train+val rows whatever the tuning set
    assert torch.equal(published.heads, train.heads) and torch.equal(published.heads, fold.heads)
    fit_questions = np.concatenate([SPLIT["train"], SPLIT["val"]])
    fit_rows = data.rows_of(fit_questions)
    truthful = data.texts["truthful"].to_numpy()[fit_rows]
    for k, (l, h) in enumerate(published.heads.tolist()):
        a = np.asarray(data.activations[fit_rows, l, h], dtype=np.float64)  # (N_fit, d)
        vec = a[truthful == 1].mean(0) - a[truthful == 0].mean(0)
        vec /= np.linalg.norm(vec)
        np.testing.assert_allclose(published.directions[k].numpy(), vec, rtol=1e-5, atol=1e-6)
        # published: every tqa_gen_end_q text, test questions included
        assert float(published.sigmas[k]) == pytest.approx(projection_std(tuning.activations, l, h, vec), rel=1e-5)
        fold_acts = tuning.activations[np.sort(tuning.rows_of(fit_questions))]
        assert float(fold.sigmas[k]) == pytest.approx(projection_std(fold_acts, l, h, vec), rel=1e-5)
        assert float(train.sigmas[k]) == pytest.approx(projection_std(data.activations[fit_rows], l, h, vec), rel=1e-5)
    assert not np.allclose(published.sigmas.numpy(), train.sigmas.numpy(), rtol=1e-3)
    assert not np.allclose(published.sigmas.numpy(), fold.sigmas.numpy(), rtol=1e-3)
    assert published.meta["tuning_dataset"] == "tqa_gen_end_q_all"
    assert published.meta["tuning_rows"] == len(tuning.texts) > len(fit_rows)
    assert train.meta["tuning_dataset"] == "same" and train.meta["tuning_rows"] == len(fit_rows)


def test_iti_sigma_source_is_checked(activations, tmp_path):
    data, tuning = activations.data, activations.tuning
    cfg = ITIConfig(num_heads=3, alpha=1.0, direction="com")
    with pytest.raises(ValueError, match="needs the tqa_gen_end_q activations: pass them as `tuning`"):
        iti_for_fold(data, SPLIT, cfg, tmp_path / "x")
    # a folder fitted with another sigma source is fitted again, not reused
    folder = tmp_path / "iti"
    same = iti_for_fold(data, SPLIT, replace(cfg, tuning_dataset="same"), folder)
    published = iti_for_fold(data, SPLIT, cfg, folder, tuning=tuning)
    assert published.meta["tuning_dataset"] == "tqa_gen_end_q_all"
    assert not torch.equal(published.sigmas, same.sigmas)
    assert torch.equal(iti_for_fold(data, SPLIT, cfg, folder, tuning=tuning).sigmas, published.sigmas)


def test_iti_heads_fitted_by_the_other_solver_are_fitted_again(activations, tmp_path):
    """A folder's heads are reused only under the solver that fitted them (the policy's meta names it)."""
    data, tuning = activations.data, activations.tuning
    cfg, folder = ITIConfig(num_heads=3, alpha=1.0, direction="com"), tmp_path / "iti"
    assert iti_for_fold(data, SPLIT, cfg, folder, tuning=tuning).meta["solver"] == "sklearn"
    assert iti_for_fold(data, SPLIT, cfg, folder, tuning=tuning, solver="torch").meta["solver"] == "torch"
    assert Policy.load(folder).meta["solver"] == "torch"  # fitted again and saved, not read back
    assert iti_for_fold(data, SPLIT, cfg, folder, tuning=tuning).meta["solver"] == "sklearn"


def test_maps_are_refitted_when_their_data_changes(tmp_path, monkeypatch):
    """The maps' cache key holds a hash of the activations and probes: same file name, other rows -> refitted."""
    import slim.policies.fit as fit
    from slim.config import SlimConfig
    from slim.stage1.fit import FoldProbes

    rng = np.random.default_rng(0)
    N, L, H, d = 60, 2, 3, 4
    probes = FoldProbes(rng.standard_normal((L, H, d)), np.zeros((L, H)), np.ones(L, int), [], tmp_path / "p")
    acts = rng.standard_normal((N, H, d)).astype(np.float32)
    maps = tmp_path / "maps.safetensors"
    cfg = SlimConfig(gamma=0.1, kappa=1.0)
    fits = []
    real = fit.fit_layer_maps
    monkeypatch.setattr(fit, "fit_layer_maps", lambda *a, **k: fits.append(1) or real(*a, **k))
    first = fit.slim_for_fold(acts, probes, 1, cfg, maps)
    again = fit.slim_for_fold(acts, probes, 1, cfg, maps)
    assert len(fits) == 1 and torch.equal(first.A, again.A)  # read back
    other_rows = fit.slim_for_fold(acts[::-1].copy() * 1.5, probes, 1, cfg, maps)  # same count, other rows
    assert len(fits) == 2 and not torch.equal(other_rows.A, first.A)
    probes.weight[1] += 1.0  # retrained probes, same file name
    fit.slim_for_fold(acts, probes, 1, cfg, maps)
    assert len(fits) == 3


CONCURRENT_FIT = """
import sys, time
import numpy as np
import slim.policies.fit as fit
from slim.config import SlimConfig
from slim.stage1.fit import FoldProbes

folder = sys.argv[1]
real = fit.fit_layer_maps
def counted(*a, **k):  # notes the fit and takes a while, so the other process asks meanwhile
    with open(folder + "/fits.txt", "a") as f:
        f.write("fit\\n")
    time.sleep(1.0)
    return real(*a, **k)
fit.fit_layer_maps = counted
rng = np.random.default_rng(0)
probes = FoldProbes(rng.standard_normal((2, 3, 4)), np.zeros((2, 3)), np.ones(2, int), [], folder + "/p")
acts = rng.standard_normal((60, 3, 4)).astype(np.float32)
policy = fit.slim_for_fold(acts, probes, 1, SlimConfig(gamma=0.1, kappa=1.0), folder + "/maps.safetensors")
np.save(folder + "/A_" + sys.argv[2] + ".npy", policy.A.numpy())
"""


def test_concurrent_runs_fit_the_maps_once(tmp_path):
    """Two processes wanting the same maps at once (ENGINE=ray's tasks, one per kappa): one fits them under the
    maps' lock, the other waits and reads them back."""
    import subprocess
    import sys

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_FIT, str(tmp_path), str(i)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert (tmp_path / "fits.txt").read_text() == "fit\n"
    assert np.array_equal(np.load(tmp_path / "A_0.npy"), np.load(tmp_path / "A_1.npy"))

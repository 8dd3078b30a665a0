"""Figure 2 (slim.paper.figures.plot_sweep):

bands from slim.stats on the pooled verdicts, the chosen value, the reference.
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from slim.paper.figures import plot_sweep, read_scored
from slim.stats import mean_interval, true_info_interval


def _scored_csv(path, idx, true, info):
    """A scored answers CSV as slim.evaluation writes it (scores on either side of 0.5)."""
    pd.DataFrame(
        {
            "question_idx": idx,
            "question": [f"question {i}?" for i in idx],
            "generation": [f"\nA: answer {i}.\n" for i in idx],
            "answer": [f"answer {i}." for i in idx],
            "answer_rule": "published",
            "truth_score": np.where(true, 0.9, 0.1),
            "info_score": np.where(info, 0.8, 0.2),
        }
    ).to_csv(path, index=False)


def _summary(folder, method, knob, verdicts_by_fold, scored=True, sem=0.4):
    """A sweep summary JSON: per-fold rows naming their scored answers (unless `scored` is False), the fold mean."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{method}_{'_'.join(f'{k}{v:g}' for k, v in knob.items())}"
    rows = []
    for fold, (t, i) in verdicts_by_fold.items():
        row = {"method": method, "fold": fold, "split": "val", "model": "m", "run": "m", **knob}
        row.update(true=100 * t.mean(), info=100 * i.mean(), sem=sem, degeneracy=0.0, n_questions=len(t))
        row["true_info"] = row["true"] * row["info"] / 100
        if scored:
            path = folder / f"{name}_fold{fold}_val_scored.csv"
            _scored_csv(path, np.arange(len(t)) + 100 * fold, t, i)
            row["scored_answers"] = str(path)
        rows.append(row)
    mean = {k: v for k, v in rows[0].items() if k != "scored_answers"}
    for key in ("true", "info", "true_info", "sem", "n_questions"):
        mean[key] = float(np.mean([r[key] for r in rows]))
    rows.append(dict(mean, fold="mean"))
    path = folder / f"{name}_val.json"
    path.write_text(json.dumps(rows))
    return path


def _best(folder, param, value, method):
    path = folder / f"m_best_{method}.json"
    path.write_text(json.dumps({"param": param, "value": value, "criterion": "true_info", "candidates": []}))
    return path


def _verdicts(rng, n, p_true, p_info):
    return {f: (rng.random(n) < p_true, rng.random(n) < p_info) for f in (0, 1)}


@pytest.fixture
def sweep(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "sweep"
    verdicts = {k: _verdicts(rng, 40, 0.4 + k / 200, 0.7 - k / 200) for k in (0.0, 20.0, 40.0)}
    summaries = [_summary(folder, "slim", {"kappa": k}, v, sem=0.4 + k / 400) for k, v in verdicts.items()]
    base = _summary(folder, "baseline", {}, verdicts[0.0])
    return folder, summaries, base, verdicts


def test_the_band_of_a_point_is_slim_stats_interval_of_its_pooled_verdicts(sweep, tmp_path):
    folder, summaries, base, verdicts = sweep
    out = tmp_path / "fig" / "figure2.png"
    points = plot_sweep([base, *summaries], _best(folder, "kappa", 20.0, "slim"), out)
    assert out.is_file() and out.stat().st_size > 1000
    t = np.concatenate([verdicts[20.0][f][0] for f in (0, 1)]).astype(float)  # pooled over both folds
    i = np.concatenate([verdicts[20.0][f][1] for f in (0, 1)]).astype(float)
    at = points[points["x"] == 20.0].set_index("metric")
    assert tuple(at.loc["true", ["value", "lo", "hi"]]) == mean_interval(100 * t)
    assert tuple(at.loc["info", ["value", "lo", "hi"]]) == mean_interval(100 * i)
    assert tuple(at.loc["true_info", ["value", "lo", "hi"]]) == true_info_interval(t, i)
    assert at.loc["true", "lo"] < at.loc["true", "value"] < at.loc["true", "hi"]
    assert at.loc["true", "questions"] == 80
    # SEM: no per-question [Q >= 0] in the scored answers, so its summary value without a band
    assert at.loc["sem", "value"] == pytest.approx(0.45) and not at.loc["sem", "band"]


def test_the_chosen_value_is_marked_and_the_baseline_is_the_reference(sweep, tmp_path):
    folder, summaries, base, _ = sweep
    points = plot_sweep([base, *summaries], _best(folder, "kappa", 40.0, "slim"), tmp_path / "f.png")
    curve = points[points["curve"]]
    assert sorted(curve["x"].unique()) == [0.0, 20.0, 40.0]
    assert set(curve["method"]) == {"slim"}  # SLIM has its own kappa = 0: the baseline is the line only
    assert set(points.loc[points["chosen"], "x"]) == {40.0}
    assert set(points.loc[points["reference"], "summary"]) == {str(base)}
    # without a baseline summary the point at kappa = 0 is the reference; ITI's baseline sits at alpha = 0
    points = plot_sweep(summaries, _best(folder, "kappa", 0.0, "slim"), tmp_path / "g.png")
    assert set(points.loc[points["reference"], "x"]) == {0.0} and set(points.loc[points["chosen"], "x"]) == {0.0}


def test_iti_sweep_puts_the_unintervened_model_at_alpha_zero(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "iti"
    base = _summary(folder, "baseline", {}, _verdicts(rng, 30, 0.4, 0.7))
    iti = _summary(folder, "iti", {"alpha": 5.0}, _verdicts(rng, 30, 0.6, 0.5))
    points = plot_sweep([base, iti], _best(folder, "alpha", 0.0, "iti"), tmp_path / "iti.png")
    assert sorted(points["x"].unique()) == [0.0, 5.0]
    assert (
        points.loc[points["x"] == 0.0, "method"].eq("baseline").all() and points.loc[points["x"] == 0.0, "chosen"].all()
    )


def test_a_summary_without_scored_answers_is_a_point_without_a_band(sweep, tmp_path, caplog):
    folder, summaries, _, _ = sweep
    old = _summary(tmp_path / "old", "slim", {"kappa": 80.0}, _verdicts(np.random.default_rng(2), 40, 0.6, 0.4), False)
    with caplog.at_level(logging.WARNING, logger="slim.paper.figures"):
        points = plot_sweep([*summaries, old], _best(folder, "kappa", 20.0, "slim"), tmp_path / "f.png")
    at = points[points["x"] == 80.0].set_index("metric")
    assert not at["band"].any() and at["lo"].isna().all()
    assert at.loc["true", "value"] == json.loads(old.read_text())[-1]["true"]  # the summary's fold mean
    assert "plotted without a band" in caplog.text and "name no scored answers" in caplog.text


def test_a_moved_run_folder_reads_its_own_answers_not_a_namesake(tmp_path, monkeypatch):
    run = tmp_path / "copy" / "validation"
    t, i = np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)
    (run / "answers" / "m").mkdir(parents=True)
    _scored_csv(run / "answers" / "m" / "slim_fold0_val_scored.csv", np.arange(4), t, i)
    decoy = tmp_path / "cwd" / "validation" / "answers" / "m"  # the recorded relative name, from the working dir
    decoy.mkdir(parents=True)
    _scored_csv(decoy / "slim_fold0_val_scored.csv", np.arange(4), ~t, i)
    row = {"method": "slim", "fold": 0, "split": "val", "kappa": 1.0, "true": 50.0}
    row["scored_answers"] = "validation/answers/m/slim_fold0_val_scored.csv"
    (run / "summary").mkdir()
    summary = run / "summary" / "m_slim_kappa1_val.json"
    summary.write_text(json.dumps([row, dict(row, fold="mean")]))
    monkeypatch.chdir(tmp_path / "cwd")
    _, scored, missing = read_scored(summary)
    assert missing is None and scored["true"].tolist() == t.tolist()


def test_true_info_interval_against_a_hand_bootstrap():
    rng = np.random.default_rng(4)
    t, i = rng.random(300) < 0.45, rng.random(300) < 0.6
    value, lo, hi = true_info_interval(t, i)
    assert value == pytest.approx(100 * t.mean() * i.mean())
    idx = np.random.default_rng(5).integers(0, 300, (20000, 300))  # questions resampled with both verdicts
    hand = np.percentile(100 * t[idx].mean(1) * i[idx].mean(1), [2.5, 97.5])
    np.testing.assert_allclose([lo, hi], hand, atol=0.6)
    assert true_info_interval(np.ones(5), np.ones(5)) == (100.0, 100.0, 100.0)


def test_refusals_mixed_methods_and_two_summaries_of_one_setting(sweep, tmp_path):
    folder, summaries, _, _ = sweep
    rng = np.random.default_rng(3)
    iti = _summary(tmp_path / "other", "iti", {"alpha": 5.0, "kappa": 5.0}, _verdicts(rng, 10, 0.5, 0.5))
    with pytest.raises(ValueError, match="several methods"):
        plot_sweep([*summaries, iti], _best(folder, "kappa", 20.0, "slim"), tmp_path / "f.png")
    twin = _summary(tmp_path / "twin", "slim", {"kappa": 20.0}, _verdicts(rng, 10, 0.5, 0.5))
    with pytest.raises(ValueError, match="several summaries at kappa = 20"):
        plot_sweep([*summaries, twin], _best(folder, "kappa", 20.0, "slim"), tmp_path / "f.png")
    with pytest.raises(ValueError, match="has no 'alpha'"):
        plot_sweep(summaries, _best(folder, "alpha", 2.0, "iti"), tmp_path / "f.png")


def test_command_line_writes_the_figure_and_says_a_missing_file_in_one_line(sweep, tmp_path):
    folder, summaries, _, _ = sweep
    env = dict(os.environ, OMP_NUM_THREADS="1")
    best = _best(folder, "kappa", 20.0, "slim")
    cmd = [sys.executable, "-m", "slim.paper.figures", "sweep", *map(str, summaries), "--best", str(best)]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "cli.png")], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cli.png").is_file() and "20 (chosen)" in done.stdout
    missing = [*cmd[:4], str(tmp_path / "nope.json"), "--best", str(best), "--out", str(tmp_path / "x.png")]
    done = subprocess.run(missing, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope.json'} does not exist: pass files the scripts wrote (see --help)."
    ]

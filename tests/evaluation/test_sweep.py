"""Choosing the knob from validation summaries (slim.evaluation.sweep) and reading it back (`--alpha best`)."""

import json

import pytest

import slim_utils as su
from slim.evaluation.sweep import main, select_best
from slim.layout import RunLayout


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

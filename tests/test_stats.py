"""Bootstrap intervals (slim.stats) against a hand computation, and the report's paired differences."""

import json

import numpy as np
import pandas as pd
import pytest

from slim.evaluation.reports import paired_differences, paired_markdown
from slim.stats import mean_interval, paired_difference


def _hand_bootstrap(tb, ib, tm, im, n=20000, seed=1):
    """Resample questions with replacement, the same indices for both methods: percentile interval of each."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(tb), (n, len(tb)))
    true = 100 * (tm[idx].mean(1) - tb[idx].mean(1))
    ti = 100 * (tm[idx].mean(1) * im[idx].mean(1) - tb[idx].mean(1) * ib[idx].mean(1))
    return np.percentile(true, [2.5, 97.5]), np.percentile(ti, [2.5, 97.5])


def test_paired_difference_against_a_hand_bootstrap():
    rng = np.random.default_rng(0)
    n = 300
    tb, ib = rng.random(n) < 0.4, rng.random(n) < 0.7
    tm = tb | (rng.random(n) < 0.2)  # the method makes some answers true, and costs some informativeness
    im = ib & (rng.random(n) < 0.9)
    got = paired_difference({"true": tb, "info": ib}, {"true": tm, "info": im})
    assert got["true"][0] == pytest.approx(100 * (tm.mean() - tb.mean()))
    assert got["info"][0] == pytest.approx(100 * (im.mean() - ib.mean()))
    assert got["true_info"][0] == pytest.approx(100 * (tm.mean() * im.mean() - tb.mean() * ib.mean()))
    hand_true, hand_ti = _hand_bootstrap(*(x.astype(float) for x in (tb, ib, tm, im)))
    np.testing.assert_allclose(got["true"][1:3], hand_true, atol=0.6)
    np.testing.assert_allclose(got["true_info"][1:3], hand_ti, atol=0.6)
    assert got["true"][3] < 0.001  # a clear gain
    same = paired_difference({"true": tb, "info": ib}, {"true": tb, "info": ib})
    assert same["true"][:3] == (0.0, 0.0, 0.0) and same["true"][3] == 1.0


def test_mean_interval_brackets_the_mean():
    x = np.random.default_rng(2).normal(1.0, 1.0, 400)
    m, lo, hi = mean_interval(x)
    assert m == pytest.approx(x.mean()) and lo < m < hi and hi - lo == pytest.approx(2 * 1.96 * x.std() / 20, rel=0.2)


def _summary(tmp_path, method, knob, verdicts_by_fold):
    rows = []
    for fold, (t, i) in verdicts_by_fold.items():
        scored = tmp_path / f"{method}_{fold}_scored.csv"
        idx = np.arange(len(t)) + 1000 * fold
        pd.DataFrame(
            {"question_idx": idx, "truth_score": np.where(t, 0.9, 0.1), "info_score": np.where(i, 0.8, 0.2)}
        ).to_csv(scored, index=False)
        rows.append({"method": method, "fold": fold, "split": "test", "scored_answers": str(scored), **knob})
    t = np.concatenate([t for t, _ in verdicts_by_fold.values()]).mean()
    i = np.concatenate([i for _, i in verdicts_by_fold.values()]).mean()
    means = {"true": 100 * t, "info": 100 * i, "true_info": 100 * t * i, "sem": 0.4, "degeneracy": 0.0}
    n = np.mean([len(t) for t, _ in verdicts_by_fold.values()])
    rows.append({"method": method, "fold": "mean", "split": "test", "n_questions": n, **means, **knob})
    path = tmp_path / f"{method}.json"
    path.write_text(json.dumps(rows))
    return path


def test_report_gives_paired_differences_per_fold_and_pooled(tmp_path):
    rng = np.random.default_rng(3)
    base = {f: (rng.random(50) < 0.4, rng.random(50) < 0.7) for f in (0, 1)}
    better = {f: (t | (rng.random(50) < 0.3), i) for f, (t, i) in base.items()}
    paths = [_summary(tmp_path, "baseline", {}, base), _summary(tmp_path, "iti", {"alpha": 2.0}, better)]
    diffs = paired_differences(paths)
    assert diffs["fold"].tolist() == [0, 1, "pooled"] and diffs["questions"].tolist() == [50, 50, 100]
    pooled_true = (
        np.concatenate([better[f][0] for f in (0, 1)]).mean() - np.concatenate([base[f][0] for f in (0, 1)]).mean()
    )
    assert diffs["true"].iloc[2][0] == pytest.approx(100 * pooled_true)
    assert diffs["info"].iloc[2][:3] == (0.0, 0.0, 0.0)
    text = paired_markdown(diffs)
    assert "| iti | alpha = 2 | pooled | 100 |" in text and "paired 95 % bootstrap" in text
    assert paired_differences([paths[1]]).empty  # no unintervened summary: nothing to pair with


def test_report_gives_each_method_its_pooled_values_with_intervals(tmp_path):
    from slim.evaluation.reports import interval_markdown, interval_table

    rng = np.random.default_rng(4)
    verdicts = {f: (rng.random(80) < 0.4, rng.random(80) < 0.7) for f in (0, 1)}
    path = _summary(tmp_path, "iti", {"alpha": 2.0}, verdicts)
    row = interval_table([path]).iloc[0]
    t = np.concatenate([verdicts[f][0] for f in (0, 1)]).astype(float)
    i = np.concatenate([verdicts[f][1] for f in (0, 1)]).astype(float)
    assert row["questions"] == 160 and row["setting"] == "alpha = 2"
    assert row["true"][0] == pytest.approx(100 * t.mean()) and row["info"][0] == pytest.approx(100 * i.mean())
    assert row["true_info"][0] == pytest.approx(100 * t.mean() * i.mean())
    # the True % interval against a hand percentile bootstrap over the pooled questions
    idx = np.random.default_rng(5).integers(0, len(t), (20000, len(t)))
    hand = np.percentile(100 * t[idx].mean(1), [2.5, 97.5])
    np.testing.assert_allclose(row["true"][1:], hand, atol=1.5)
    assert row["true_info"][1] < row["true_info"][0] < row["true_info"][2]
    assert "| iti | alpha = 2 | 160 |" in interval_markdown(interval_table([path]))


def test_report_pairs_every_row_against_a_chosen_summary(tmp_path):
    from slim.evaluation.reports import main as report

    rng = np.random.default_rng(6)
    base = {f: (rng.random(60) < 0.4, rng.random(60) < 0.7) for f in (0, 1)}
    iti = {f: (t | (rng.random(60) < 0.3), i) for f, (t, i) in base.items()}
    slim = {f: (t | (rng.random(60) < 0.5), i & (rng.random(60) < 0.8)) for f, (t, i) in base.items()}
    paths = [
        _summary(tmp_path, "baseline", {}, base),
        _summary(tmp_path, "slim", {"kappa": 40.0}, slim),
        _summary(tmp_path, "iti", {"alpha": 2.0}, iti),
    ]
    diffs = paired_differences(paths, reference=paths[2])
    assert diffs["method"].tolist() == ["baseline"] * 3 + ["slim"] * 3  # the reference is not paired with itself

    def pooled(v, k):
        return np.concatenate([v[f][k] for f in (0, 1)]).astype(float).mean()

    slim_row = diffs[(diffs["method"] == "slim") & (diffs["fold"] == "pooled")].iloc[0]
    assert slim_row["true"][0] == pytest.approx(100 * (pooled(slim, 0) - pooled(iti, 0)))
    assert slim_row["info"][0] == pytest.approx(100 * (pooled(slim, 1) - pooled(iti, 1)))
    base_row = diffs[(diffs["method"] == "baseline") & (diffs["fold"] == "pooled")].iloc[0]
    assert base_row["true"][0] == pytest.approx(100 * (pooled(base, 0) - pooled(iti, 0)))

    out = tmp_path / "versus.md"
    report([*map(str, paths), "--paired_against", str(paths[2]), "--out", str(out)])
    text = out.read_text()
    assert f"Change from iti (alpha = 2; `{paths[2]}`) on the same questions" in text
    assert "| slim | kappa = 40 | pooled | 120 |" in text and "| iti | alpha = 2 | pooled |" not in text
    with pytest.raises(ValueError, match="is not among the summaries: list it there too"):
        report([*map(str, paths[:2]), "--paired_against", str(paths[2])])

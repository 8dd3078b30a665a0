"""Figure 2: the validation sweeps, True %, Info %, True*Info and SEM against the knob, with 95 % bands.

    python -m slim.paper.figures sweep validation/summary/smollm2_135M_slim_kappa*_val.json \
        --best validation/smollm2_135M_best_slim.json --out paper/figure2_smollm2_135M_slim_sweep.png
    python -m slim.paper.figures sweep validation/summary/smollm2_135M_baseline_val.json \
        validation/summary/smollm2_135M_iti_alpha*_val.json \
        --best validation/smollm2_135M_best_iti.json --out paper/figure2_smollm2_135M_iti_sweep.png

Each point is one summary JSON of the sweep, its fold rows' scored answers pooled over folds: True %, Info % and
True*Info of the pooled verdicts (score > 0.5), each with its 95 % bootstrap interval over questions (slim.stats;
True*Info resamples questions with both their verdicts). SEM is the summary's fold mean, without a band: the
per-question [Q >= 0] behind it is not stored in the scored answers. A summary whose fold rows name no scored
answers (written before they were recorded) gives its fold-mean values without a band.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..evaluation.reports import _pyplot

log = logging.getLogger(__name__)

KNOBS = {"slim": "kappa", "iti": "alpha", "mimic": "strength", "linear_act": "strength"}
METHOD_NAMES = {"baseline": "unintervened", "slim": "SLIM", "iti": "ITI", "mimic": "MiMiC", "linear_act": "Linear-AcT"}
# (summary field, axis label) of each panel
PANELS = (("true", "True %"), ("info", "Info %"), ("true_info", "True*Info"), ("sem", "SEM"))


# ---------------------------------------------------------------------------------------------
# reading the scored answers of a summary


def require_files(paths) -> None:
    """One-line error for the first input that is not there."""
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"{path} does not exist: pass files the scripts wrote (see --help).")


def scored_file(summary_path, recorded) -> Path | None:
    """The scored answers CSV a fold row names, or None when it is not there.

    First under the summary's own run folder (`<out_dir>/answers/<tag>/<file>`, where slim.layout puts it beside
    `<out_dir>/summary/`), so a run folder that was moved or copied still finds its own answers and not those of
    another run under the same relative name; then as recorded (relative names: to the working directory).
    """
    recorded = Path(recorded)
    candidates = []
    if len(recorded.parts) >= 3 and recorded.parts[-3] == "answers":
        candidates.append(Path(summary_path).parent.parent.joinpath(*recorded.parts[-3:]))
    candidates.append(recorded)
    return next((c for c in candidates if c.is_file()), None)


SCORED_COLUMNS = ("question_idx", "question", "answer", "truth_score", "info_score")


def read_scored_csv(path: Path) -> pd.DataFrame:
    """A scored answers CSV (slim.evaluation); a one-line ValueError for one that is damaged or of another kind."""
    try:
        df = pd.read_csv(path, keep_default_na=False)  # an answer "None" or "NA" stays text
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} does not parse ({type(err).__name__}): rerun the evaluation that wrote it.") from None
    missing = [c for c in SCORED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} has no column {', '.join(missing)}: is it a scored answers CSV?")
    return df


def read_scored(summary_path) -> tuple[dict, pd.DataFrame | None, str | None]:
    """(fold-mean row, the fold rows' scored answers pooled, why they are missing).

    The pooled frame has the scored CSV's columns plus `fold`, `true` and `info` (the judges' verdicts, score > 0.5);
    it is None, with the reason, when a fold row names no scored answers or its file is not there: half the
    questions would give a band for another set of questions.
    """
    from ..evaluation.metrics import read_summary

    fold_rows, mean = read_summary(summary_path)
    parts = []
    for row in fold_rows:
        if not row.get("scored_answers"):
            return mean, None, "its fold rows name no scored answers (summary written before they were recorded)"
        path = scored_file(summary_path, row["scored_answers"])
        if path is None:
            return mean, None, f"the scored answers of fold {row['fold']} ({row['scored_answers']}) are not there"
        df = read_scored_csv(path)
        parts.append(df.assign(fold=row["fold"], true=df["truth_score"] > 0.5, info=df["info_score"] > 0.5))
    if not parts:
        return mean, None, "it has no fold rows"
    return mean, pd.concat(parts, ignore_index=True), None


# ---------------------------------------------------------------------------------------------
# the points of a sweep


def metric_intervals(scored: pd.DataFrame | None, mean: dict) -> dict[str, tuple[float, float, float]]:
    """{panel: (value, lo, hi)} of one summary; lo = hi = nan where there is no band."""
    from ..stats import mean_interval, true_info_interval

    nan = float("nan")
    out = {name: (float(mean[name]), nan, nan) for name, _ in PANELS}
    if scored is not None:
        true, info = scored["true"].to_numpy(float), scored["info"].to_numpy(float)
        out["true"] = mean_interval(100.0 * true)
        out["info"] = mean_interval(100.0 * info)
        out["true_info"] = true_info_interval(true, info)
    return out


def sweep_points(summaries, param: str) -> pd.DataFrame:
    """One row per summary and panel: summary, method, x (the knob), metric, value, lo, hi, band, questions.

    The unintervened model's summary (method "baseline", as ITI's alpha = 0 is run) sits at x = 0, as in
    slim.evaluation.sweep. Points with verdicts are the pooled values (equal to the fold means when the folds are of
    equal size; True*Info is the product of the pooled rates, not the mean of the folds' products).
    """
    rows = []
    for path in summaries:
        mean, scored, missing = read_scored(path)
        if mean["method"] != "baseline" and param not in mean:
            raise ValueError(f"{path} has no {param!r}: is it a summary of this sweep's method?")
        if missing:
            log.warning("%s: plotted without a band: %s.", path, missing)
        x = 0.0 if mean["method"] == "baseline" else float(mean[param])
        for metric, (value, lo, hi) in metric_intervals(scored, mean).items():
            rows.append(
                {
                    "summary": str(path),
                    "method": mean["method"],
                    "model": mean.get("run", mean.get("model", "")),
                    "x": x,
                    "metric": metric,
                    "value": value,
                    "lo": lo,
                    "hi": hi,
                    "band": bool(np.isfinite(lo) and np.isfinite(hi)),
                    "questions": len(scored) if scored is not None else None,
                }
            )
    return pd.DataFrame(rows)


def split_reference(points: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(the sweep's points, the unintervened model's points for the reference line).

    The reference is a baseline summary where one is given, else the sweep's point at knob 0 (ITI's alpha = 0
    runs as the unintervened model; SLIM's kappa = 0 moves nothing). A baseline summary is also a point of the
    curve, at 0, unless the method has its own point there.
    """
    is_base = points["method"] == "baseline"
    method_points, base = points[~is_base], points[is_base]
    if not base.empty:
        first = base[base["summary"] == base["summary"].iloc[0]]
        at_zero = (method_points["x"] == 0).any()
        curve = method_points if at_zero else pd.concat([method_points, first], ignore_index=True)
        return curve, first
    zero = method_points[method_points["x"] == 0]
    if zero.empty:
        log.warning("no unintervened summary and no point at 0: the figure has no unintervened reference.")
        return method_points, None
    return method_points, zero[zero["summary"] == zero["summary"].iloc[0]]


def read_best(best_json) -> tuple[str, float]:
    """(param, value) of the sweep's choice, `<out_dir>/<model>_best_<method>.json` (slim.evaluation.sweep)."""
    try:
        best = json.loads(Path(best_json).read_text())
        return str(best["param"]), float(best["value"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{best_json} is not a sweep's choice (param, value; slim.evaluation.sweep): {err}") from None


# ---------------------------------------------------------------------------------------------
# the figure


def _draw_panel(ax, curve: pd.DataFrame, reference: pd.DataFrame | None, metric: str, label: str, chosen: float):
    part = curve[curve["metric"] == metric].sort_values("x")
    ax.plot(part["x"], part["value"], color="C0", marker="o", ms=4, label="pooled over folds")
    banded = part[part["band"]]
    if not banded.empty:  # the band breaks where a point has none; the bars show a band of one point alone
        ax.fill_between(part["x"], part["lo"], part["hi"], color="C0", alpha=0.2, label="95 % band")
        bars = [banded["value"] - banded["lo"], banded["hi"] - banded["value"]]
        ax.errorbar(banded["x"], banded["value"], yerr=bars, fmt="none", ecolor="C0", capsize=3, lw=1)
    bare = part[~part["band"]]
    if metric != "sem" and not bare.empty:  # SEM never has a band: its marker says nothing
        ax.plot(
            bare["x"],
            bare["value"],
            ls="none",
            marker="o",
            ms=8,
            mfc="none",
            mec="C3",
            label="no scored answers: no band",
        )
    if reference is not None:
        value = reference.loc[reference["metric"] == metric, "value"].iloc[0]
        ax.axhline(value, color="grey", ls="--", lw=1, label="unintervened")
    ax.axvline(chosen, color="C2", ls=":", lw=1.5, label="chosen")
    at_chosen = part[np.isclose(part["x"], chosen)]
    ax.plot(at_chosen["x"], at_chosen["value"], ls="none", marker="*", ms=14, color="C2")
    ax.set_ylabel(label)
    ax.set_title(label if metric != "sem" else "SEM (no band: per-question [Q >= 0] not stored)", fontsize=9)
    ax.grid(alpha=0.3)


def plot_sweep(summaries, best_json, path: str | os.PathLike) -> pd.DataFrame:
    """Figure 2 for one sweep (SLIM's kappa or ITI's alpha): four panels against the knob, PNG at `path`.

    Returns the plotted data: `sweep_points` of every summary plus `curve` (a point of the curve), `chosen` (the
    sweep's choice) and `reference` (the unintervened reference line; a baseline summary beside the method's own
    point at 0 is the line only).
    """
    from ..evaluation.metrics import check_same_judges, read_summary

    require_files([*summaries, best_json])
    check_same_judges([read_summary(s)[1] for s in summaries], summaries)  # one judge's verdicts only
    param, chosen = read_best(best_json)
    points = sweep_points(summaries, param)
    methods = sorted(set(points["method"]) - {"baseline"})
    if len(methods) > 1:
        raise ValueError(f"the summaries hold several methods ({', '.join(methods)}): plot one sweep at a time.")
    curve, reference = split_reference(points)
    repeated = curve.groupby("x")["summary"].nunique()
    if (repeated > 1).any():
        x = repeated[repeated > 1].index[0]
        raise ValueError(f"several summaries at {param} = {x:g}: pass one summary per setting of the sweep.")
    if not np.isclose(curve["x"], chosen).any():
        log.warning("the chosen %s = %g is not among the plotted summaries.", param, chosen)

    name = METHOD_NAMES.get(methods[0], methods[0]) if methods else "unintervened"
    questions = curve["questions"].dropna()
    on = f"{int(questions.max())} validation questions" if len(questions) else "validation questions"
    title = f"{points['model'].iloc[0]}: {name} sweep of {param} on {on} (chosen {param} = {chosen:g})"
    _save_figure(curve, reference, param, chosen, title, path)
    plotted = pd.concat([curve, points[~points["summary"].isin(curve["summary"])]], ignore_index=True)
    return plotted.assign(
        curve=plotted["summary"].isin(curve["summary"]),
        chosen=plotted["summary"].isin(curve["summary"]) & np.isclose(plotted["x"], chosen),
        reference=plotted["summary"] == (reference["summary"].iloc[0] if reference is not None else None),
    )


def _save_figure(curve, reference, param: str, chosen: float, title: str, path) -> Path:
    """The four panels side by side, one legend under them, PNG at `path`."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), sharex=True)
    for ax, (metric, label) in zip(axes.flat, PANELS):
        _draw_panel(ax, curve, reference, metric, label, chosen)
    for ax in axes[1]:
        ax.set_xlabel(param)
    fig.suptitle(title, fontsize=10)
    handles, labels = _legend_entries(axes.flat)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _legend_entries(axes):
    """Each label once, over all panels (a panel may lack the band or the hollow markers)."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen.keys())


def candidate_summaries(best) -> list[str]:
    """The summaries a sweep's choice was made from (slim.evaluation.sweep records them under `candidates`)."""
    require_files([best])
    try:
        return [c["summary"] for c in json.loads(Path(best).read_text())["candidates"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{best} names no candidate summaries ({type(err).__name__}: {err}): run sweep.sh again."
        ) from None


def format_points(points: pd.DataFrame) -> str:
    """The plotted numbers as text: one line per point, `value (lo to hi)` per panel."""
    lines = []
    for (x, summary), part in points[points["curve"] | points["reference"]].groupby(["x", "summary"], sort=True):
        cells = []
        for metric, label in PANELS:
            r = part[part["metric"] == metric].iloc[0]
            band = f" ({r['lo']:.3g} to {r['hi']:.3g})" if r["band"] else ""
            cells.append(f"{label} {r['value']:.3g}{band}")
        mark = " (chosen)" if part["chosen"].iloc[0] else " (reference only)" if not part["curve"].iloc[0] else ""
        lines.append(f"{x:g}{mark}: " + "; ".join(cells) + f"  [{Path(summary).name}]")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Figures of the paper from summary JSON files.")
    figures = parser.add_subparsers(dest="figure", required=True)
    sweep = figures.add_parser("sweep", help="Figure 2: a validation sweep with 95 % bands over questions")
    sweep.add_argument(
        "summaries",
        nargs="*",
        help="the sweep's summary JSONs (a baseline one gives the reference); default: the candidates --best names",
    )
    sweep.add_argument("--best", required=True, help="the sweep's choice, <out_dir>/<model>_best_<method>.json")
    sweep.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    summaries = args.summaries or candidate_summaries(args.best)
    points = plot_sweep(summaries, args.best, args.out)
    print(format_points(points))
    print(f"written to {args.out}")
    return points


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as err:  # a missing or damaged input; judges that differ
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None

"""Figures and tables: the paper's Figure 1 and the comparison table."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _finish_layer_plot(fig, ax, ylabel: str, title: str, ncol: int, path) -> Path:
    """Shared styling of the per-layer figures, then save (PNG) and close."""
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=ncol)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


def plot_fnr_fpr(metrics: pd.DataFrame, model_name: str, bl: float, path: str | os.PathLike) -> Path:
    """Figure 1(a): FNR and FPR of the layer detector (at its chosen tau) across layers, per fold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for fold, part in metrics.groupby("fold"):
        part = part.sort_values("layer")
        ax.plot(part["layer"], part["fnr"], marker="o", ms=3, label=f"FNR, fold {fold}")
        ax.plot(part["layer"], part["fpr"], marker="s", ms=3, ls="--", label=f"FPR, fold {fold}")
    out = _finish_layer_plot(
        fig,
        ax,
        "rate on validation questions",
        f"{model_name}: layer detectors (risk-aware probes, bl = {bl:g}, tau chosen on val)",
        2,
        path,
    )
    plt.close(fig)
    return out


def plot_fnr_by_bl(metrics: pd.DataFrame, model_name: str, path: str | os.PathLike) -> Path:
    """Figure 1(b): FNR across layers for several bl (fold-averaged)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    mean = metrics.groupby(["bl", "layer"], as_index=False)["fnr"].mean()
    for bl, part in mean.groupby("bl"):
        ax.plot(part["layer"], part["fnr"], marker="o", ms=3, label=f"bl = {bl:g}")
    n_folds = metrics["fold"].nunique()
    out = _finish_layer_plot(
        fig,
        ax,
        "FNR on validation questions",
        f"{model_name}: FNR of the layer detector by bl (mean of {n_folds} folds)",
        3,
        path,
    )
    plt.close(fig)
    return out


def markdown_table(df: pd.DataFrame, columns: list[str], floatfmt: str = "{:.3f}") -> str:
    """A plain Markdown table (no extra dependency)."""
    head = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    lines = []
    for _, row in df.iterrows():
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in (row[c] for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


# each method's one knob, shown as its setting in the tables
KNOBS = {
    "slim": "kappa",
    "iti": "alpha",
    "mimic": "strength",
    "linear_act": "strength",
    "slim_on_iti_heads": "kappa",
    "iti_on_slim_layer": "alpha",
}


def _setting(row: dict) -> str:
    """`kappa = 40`-style setting of a summary row, "-" for a method without a knob (the unintervened model)."""
    knob = KNOBS.get(row["method"])
    return f"{knob} = {row[knob]:g}" if knob in row else "-"


def comparison_table(summaries: list[str | os.PathLike], labels: list[str] | None = None) -> pd.DataFrame:
    """One row per method: the fold-mean row of each summary JSON.

    Summaries scored by different judges are refused (one-line ValueError
    naming both judges). Columns `judge_id` and `info_judge_id` hold the
    judges' identities, None for a summary written before they were recorded
    (accepted when its judges' names match; `judges_note` says so).
    """
    from .metrics import check_same_judges, read_summary

    read = [read_summary(path) for path in summaries]
    check_same_judges([r for _, r in read], summaries)
    rows = []
    for i, (fold_rows, r) in enumerate(read):
        setting = _setting(r)
        folds = len(fold_rows)
        rows.append(
            {
                **({"run": labels[i]} if labels else {}),
                "method": r["method"],
                "setting": setting,
                "folds": folds,
                "questions": int(round(r["n_questions"] * folds)),
                "True*Info": r["true_info"],
                "True %": r["true"],
                "Info %": r["info"],
                "SEM": r["sem"],
                "degenerate": r["degeneracy"],
                "MC1": r.get("mc1", float("nan")),
                "MC2": r.get("mc2", float("nan")),
                "CE": r.get("ce", float("nan")),
                "KL": r.get("kl", float("nan")),
                "fires %": 100.0 * r["firing_rate"] if isinstance(r.get("firing_rate"), float) else float("nan"),
                "judge": r.get("judge"),
                "info_judge": r.get("info_judge"),
                "judge_id": r.get("judge_id"),
                "info_judge_id": r.get("info_judge_id"),
            }
        )
    return pd.DataFrame(rows)


def _verdicts(path) -> pd.DataFrame | None:
    """question_idx, true, info (0 / 1) of a scored answers CSV; None if it is not there."""
    if not path or not Path(path).exists():
        return None
    df = pd.read_csv(path, keep_default_na=False)
    return pd.DataFrame(
        {"question_idx": df["question_idx"], "true": df["truth_score"] > 0.5, "info": df["info_score"] > 0.5}
    )


def paired_differences(
    summaries: list[str | os.PathLike], labels: list[str] | None = None, reference: str | os.PathLike | None = None
) -> pd.DataFrame:
    """Each method's change from the unintervened model (a summary of method "baseline") on the same questions:
    True %, Info % and True*Info in points with paired 95 % bootstrap intervals and p-values
    (slim.stats), per fold and pooled over folds. Each summary is paired with the baseline summary in
    its own folder (one run's out_dir), else with the first baseline given. With `reference` (a summary), every
    other summary, the baseline's too, is paired with it instead (SLIM against ITI, say). Empty when there is no
    baseline or the scored answers are missing."""
    from ..stats import paired_difference
    from .metrics import read_summary

    read = [read_summary(path) for path in summaries]
    labels = list(labels) if labels else [None] * len(read)
    if reference is None:
        baselines = {Path(p).parent: f for p, (f, mean) in zip(summaries, read) if mean["method"] == "baseline"}
        skip = [mean["method"] == "baseline" for _, mean in read]
    else:
        baselines = {None: read_summary(reference)[0]}
        skip = [Path(p).resolve() == Path(reference).resolve() for p in summaries]
    if not baselines:
        return pd.DataFrame()
    first = next(iter(baselines.values()))
    rows = []
    for path, label, (folds, mean), skipped in zip(summaries, labels, read, skip):
        if skipped:  # the unintervened model (or the reference) is not paired with itself
            continue
        base_by_fold = {r["fold"]: _verdicts(r.get("scored_answers")) for r in baselines.get(Path(path).parent, first)}
        setting = _setting(mean)
        pairs = []
        for r in folds:
            b, m = base_by_fold.get(r["fold"]), _verdicts(r.get("scored_answers"))
            if b is None or m is None:
                continue
            pairs.append((r["fold"], b.merge(m, on="question_idx", suffixes=("_b", "_m"))))
        if len(pairs) > 1:
            pairs.append(("pooled", pd.concat([p for _, p in pairs], ignore_index=True)))
        for fold, joined in pairs:
            before = {"true": joined["true_b"], "info": joined["info_b"]}
            d = paired_difference(before, {"true": joined["true_m"], "info": joined["info_m"]})
            row = {"method": mean["method"], "setting": setting, "fold": fold, "questions": len(joined), **d}
            rows.append({"run": label, **row} if label else row)
    return pd.DataFrame(rows)


def interval_table(summaries: list[str | os.PathLike], labels: list[str] | None = None) -> pd.DataFrame:
    """Each summary's True*Info, True % and Info % pooled over its folds' scored answers, each with its 95 %
    bootstrap interval over questions
    (slim.stats): value, lo, hi. Rows whose scored answers are missing are left
    out."""
    from ..stats import mean_interval, true_info_interval
    from .metrics import read_summary

    rows = []
    for i, path in enumerate(summaries):
        folds, mean = read_summary(path)
        parts = [_verdicts(r.get("scored_answers")) for r in folds]
        if not parts or any(p is None for p in parts):
            continue
        v = pd.concat(parts, ignore_index=True)
        true, info = v["true"].astype(float), v["info"].astype(float)
        row = {
            "method": mean["method"],
            "setting": _setting(mean),
            "questions": len(v),
            "true_info": true_info_interval(true, info),
            "true": tuple(100.0 * x for x in mean_interval(true)),
            "info": tuple(100.0 * x for x in mean_interval(info)),
        }
        rows.append({"run": labels[i], **row} if labels else row)
    return pd.DataFrame(rows)


def interval_cell(v, signed: bool = False) -> str:
    """`v (lo to hi)` of a (value, lo, hi, ...) tuple, one decimal; `signed`: `+d (+lo to +hi)` for changes."""
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(v[0])} ({f.format(v[1])} to {f.format(v[2])})"


def interval_markdown(intervals: pd.DataFrame) -> str:
    """The pooled values with their intervals as a Markdown table: each cell `v (lo to hi)`."""
    if intervals.empty:
        return ""
    cell = interval_cell
    table = intervals.assign(
        **{"True*Info": intervals["true_info"].map(cell), "True %": intervals["true"].map(cell)},
        **{"Info %": intervals["info"].map(cell)},
    )
    cols = (["run"] if "run" in intervals else []) + ["method", "setting", "questions", "True*Info", "True %", "Info %"]
    return (
        "Pooled over folds, with 95 % bootstrap intervals over questions (BCa, 9,999 resamples):\n\n"
        + markdown_table(table, cols)
    )


def paired_markdown(diffs: pd.DataFrame, against: str = "the unintervened model") -> str:
    """The paired differences as a Markdown table: each cell `+d (lo to hi)`, and True*Info's p-value; `against`
    names what they are changes from."""
    if diffs.empty:
        return ""

    def cell(v):
        return interval_cell(v, signed=True)

    table = diffs.assign(
        **{
            "True %": diffs["true"].map(cell),
            "Info %": diffs["info"].map(cell),
            "True*Info": diffs["true_info"].map(cell),
            "p (True*Info)": diffs["true_info"].map(lambda v: "<0.001" if v[3] < 0.001 else f"{v[3]:.3f}"),
        }
    )
    cols = ["method", "setting", "fold", "questions", "True*Info", "p (True*Info)", "True %", "Info %"]
    cols = (["run"] if "run" in diffs else []) + cols
    return (
        f"Change from {against} on the same questions (points; paired 95 % bootstrap intervals over "
        "questions, 9,999 resamples; p two-sided):\n\n" + markdown_table(table, cols)
    )


def judges_note(table: pd.DataFrame) -> str:
    """One line under a comparison table: its judges, and the rows whose judges are known by name only."""
    if table.empty:
        return ""
    recorded = table["judge_id"].notna() & table["info_judge_id"].notna()
    parts = []
    if recorded.any():
        first = table[recorded].iloc[0]
        parts.append(f"Judges: truth `{first['judge_id']}`, info `{first['info_judge_id']}`.")
    if not recorded.all():
        old = table[~recorded]
        labels = [m if s == "-" else f"{m} ({s})" for m, s in zip(old["method"], old["setting"])]
        pairs = zip(old["judge"], old["info_judge"])
        names = {f"{t} / {i}" for t, i in pairs if isinstance(t, str) and isinstance(i, str)}
        by_name = f"; judged by {', '.join(sorted(names))} by name" if names else ""
        parts.append(
            f"Judge identity not recorded for {', '.join(labels)} (summaries written before judges were "
            f"identified{by_name}): rerun their evaluations to record it."
        )
    return " ".join(parts)


def main(argv=None):
    import argparse
    import datetime

    parser = argparse.ArgumentParser(description="Comparison table (Markdown) from summary JSON files.")
    parser.add_argument("summaries", nargs="+")
    parser.add_argument("--title", default="Comparison")
    parser.add_argument("--command", default=None, help="the command that produced the summaries (recorded)")
    parser.add_argument("--out", default=None, help="write the Markdown here too")
    parser.add_argument("--labels", nargs="+", default=None, help="a name for each summary's row (column 'run')")
    parser.add_argument(
        "--paired_against", default=None, help="pair every row with this summary, not the unintervened model's"
    )
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.summaries):
        raise ValueError(f"--labels names {len(args.labels)} rows for {len(args.summaries)} summaries: give one each.")
    if args.paired_against and Path(args.paired_against).resolve() not in {Path(p).resolve() for p in args.summaries}:
        raise ValueError(f"--paired_against {args.paired_against} is not among the summaries: list it there too.")
    table = comparison_table(args.summaries, args.labels)
    cols = ["method", "setting", "folds", "questions", "True*Info", "True %", "Info %", "SEM", "degenerate"]
    cols = (["run"] if args.labels else []) + cols
    for extra in (["MC1", "MC2"], ["CE", "KL"], ["fires %"]):
        if table[extra].notna().any().any():
            cols += extra
    fmt_table = table.copy()
    for c in ("True*Info", "True %", "Info %", "fires %"):
        fmt_table[c] = fmt_table[c].map(lambda v: "-" if pd.isna(v) else f"{v:.1f}")
    for c in ("MC1", "MC2", "CE", "KL"):  # a run that skipped them (Tables 2 and 3) shows "-"
        fmt_table[c] = fmt_table[c].map(lambda v: "-" if pd.isna(v) else f"{v:.3f}")
    text = f"### {args.title}\n\n" + markdown_table(fmt_table, cols)
    intervals = interval_markdown(interval_table(args.summaries, args.labels))
    text += f"\n{intervals}" if intervals else ""
    against = "the unintervened model"
    if args.paired_against:  # named by its method and setting, and its file
        from .metrics import read_summary

        _, ref = read_summary(args.paired_against)
        against = f"{ref['method']} ({_setting(ref)}; `{args.paired_against}`)"
    paired = paired_markdown(paired_differences(args.summaries, args.labels, args.paired_against), against)
    text += f"\n{paired}" if paired else ""
    note = judges_note(table)
    text += f"\n{note}\n" if note else ""
    stamp = datetime.date.today().isoformat()
    text += f"\nProduced {stamp}" + (f" by `{args.command}`" if args.command else "") + ".\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return table


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as err:  # judges that differ; a damaged summary (slim.io.DamagedArtefact)
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None

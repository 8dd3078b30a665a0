"""The judges of a run against labels of that run's own answers: were the verdicts behind a table right?

    python -m slim.judges.check --labels data/judge-labels/gemma3_270M_labels.csv \
        --out paper/judge_check_gemma3_270M_quick.md SUMMARY.json [SUMMARY.json ...]

The summaries are a table's runs (reproduce.sh's index names Table 1's). Each fold row names its scored answers,
which hold the verdicts the table was made of (P(yes) of the truth and info judges, yes above 0.5); an answer
labelled in `--labels` (matched by question and answer, white space stripped) is checked against its labels. No
judge runs again: what is measured is the instrument as it measured the table. Per method and kind: the labelled
answers, the labels' and the judges' yes %, accuracy with its 95 % bootstrap interval and balanced accuracy; then
each method's change from the unintervened answers on the same labelled questions, by the labels and by the
judges, with paired 95 % bootstrap intervals (slim.judges.card): does the table's change hold under the labels?
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pandas as pd

from ..evaluation.reports import (
    _setting,  # the tables' own naming of a run's knob
    interval_cell,
)
from ..io import write_text
from .base import THRESHOLD
from .card import card_row, mean_interval, paired_shifts

__all__ = ["labelled_verdicts", "check_markdown"]

KINDS = {"truth": ("truthful", "truth_score", "True"), "info": ("informative", "info_score", "Info")}


def labelled_verdicts(summaries: list[str | Path], labels: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Every scored answer of the summaries' fold rows that `labels` labels: question, answer, method, setting,
    fold, the judges' P(yes) (truth_score, info_score) and the labels (truthful, informative); and the judges'
    identities the summaries record. A summary that names no scored answers is a one-line ValueError."""
    labels = labels.assign(
        question=labels["question"].astype(str).str.strip(), answer=labels["answer"].astype(str).str.strip()
    )[["question", "answer", "truthful", "informative"]].drop_duplicates(["question", "answer"])
    parts, judges = [], []
    for path in summaries:
        rows = [r for r in json.loads(Path(path).read_text()) if r.get("fold") != "mean"]
        found = [r for r in rows if r.get("scored_answers") and Path(r["scored_answers"]).exists()]
        if not found:
            raise ValueError(f"{path} names no scored answers that exist: run its test run again (it reads back).")
        for r in found:
            df = pd.read_csv(r["scored_answers"], keep_default_na=False)
            df = df.assign(
                question=df["question"].astype(str).str.strip(),
                answer=df["answer"].astype(str).str.strip(),
                method=r["method"],
                setting=_setting(r),
                fold=r["fold"],
            )[["question", "answer", "method", "setting", "fold", "truth_score", "info_score"]]
            parts.append(df.merge(labels, on=["question", "answer"], how="inner"))
            judges += [f"truth `{r.get('judge_id', '?')}`", f"info `{r.get('info_judge_id', '?')}`"]
    joined = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return joined, list(dict.fromkeys(judges))


def check_markdown(joined: pd.DataFrame, judges: list[str], title: str, command: str | None = None) -> str:
    """The check as Markdown: per method and kind the agreement of the verdicts with the labels, then the
    changes from the unintervened answers by labels and by judges."""
    if joined.empty:
        raise ValueError("no answer of these runs is labelled: label answers of this model's runs first.")
    lines = [
        f"### {title}",
        "",
        f"{len(joined)} scored answers of these runs are labelled ({joined['question'].nunique()} questions). "
        f"Judges: {', '.join(judges)}; yes is P(yes) > {THRESHOLD:g}. Accuracy with its 95 % bootstrap interval "
        "over the labelled answers.",
        "",
        "| method | setting | kind | n | labels yes % | judge yes % | accuracy | balanced acc. |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    groups = [("all", "-", joined), *((m, s, g) for (m, s), g in joined.groupby(["method", "setting"], sort=False))]
    for method, setting, g in groups:
        for kind, (label, score, _) in KINDS.items():
            y, p = g[label].to_numpy() == 1, g[score].to_numpy(dtype=float)
            r = card_row(y, p)
            acc = mean_interval(((p > THRESHOLD) == y).astype(float))
            lines.append(
                f"| {method} | {setting} | {kind} | {r['n']} | {r['labels_yes']:.1f} | {r['judge_yes']:.1f} | "
                f"{acc[0]:.2f} ({acc[1]:.2f} to {acc[2]:.2f}) | {r['balanced_accuracy']:.2f} |"
            )
    base = joined[joined["method"] == "baseline"]
    if not base.empty:
        lines += [
            "",
            "Change from the unintervened answers on the same labelled questions (points, paired 95 % bootstrap): "
            "by the labels and by the judges that made the table.",
            "",
            "| method | setting | questions | True % by labels | True % by judge | Info % by labels "
            "| Info % by judge |",
            "| --- | --- | ---: | --- | --- | --- | --- |",
        ]
        table = joined.assign(**{f"yes_{k}": joined[s] > THRESHOLD for k, (_, s, _) in KINDS.items()})
        ref = ("baseline", base["setting"].iloc[0])
        truth = paired_shifts(table, "truthful", {"judge": "yes_truth"}, reference=ref)
        info = {(r["method"], r["setting"]): r for r in paired_shifts(table, "informative", {"judge": "yes_info"},
                                                                          reference=ref)}  # fmt: skip
        for t in truth:
            i = info[(t["method"], t["setting"])]
            cells = [interval_cell(v, signed=True) for v in (t["labels"], t["judge"], i["labels"], i["judge"])]
            lines.append(f"| {t['method']} | {t['setting']} | {t['n']} | " + " | ".join(cells) + " |")
    stamp = datetime.date.today().isoformat()
    lines += ["", f"Produced {stamp}" + (f" by `{command}`" if command else "") + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    import argparse
    import shlex
    import sys

    from .labels import load_judge_labels

    parser = argparse.ArgumentParser(description="A run's judges against labels of its own answers.")
    parser.add_argument("summaries", nargs="+", help="the runs' summaries (reproduce.sh's index names Table 1's)")
    parser.add_argument("--labels", required=True, help="labelled answers of this model (data/judge-labels/)")
    parser.add_argument("--out", required=True, help="the Markdown to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    labels = load_judge_labels(args.labels)
    joined, judges = labelled_verdicts(args.summaries, labels)
    title = args.title or f"The judges against {Path(args.labels).name}"
    command = "python -m slim.judges.check " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = write_text(args.out, check_markdown(joined, judges, title, command))
    print(f"written {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # a missing or damaged labels file or summary, no labelled answer
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None

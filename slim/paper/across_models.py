"""Table 1 across models, as in the paper: the models as row groups, each with its unintervened model, ITI, SLIM,
MiMiC and Linear-AcT.

    python -m slim.paper.across_models --paper_dir paper --mode full --models smollm2_135M gemma3_270M

Each model's rows are its Table 1 summaries, named by its index (`index_<model>_<mode>.json`, written by
reproduce.sh). Every value and change comes from slim.evaluation.reports, as in each model's own Table 1:
True*Info, True % and Info % pooled over the folds' scored answers with their 95 % bootstrap intervals
(interval_table), and each method's change from that model's unintervened answers on the same questions with its
paired interval (paired_differences, pooled over folds); MC1 / MC2 and CE / KL are the fold means where measured
(comparison_table). The judges are named per model (judges_note). table1_summary cuts one model's Table 1 file
to its headline, as the README shows it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..evaluation.reports import (
    comparison_table,
    interval_cell,
    interval_table,
    judges_note,
    markdown_table,
    paired_differences,
)
from ..io import write_text

# the paper's names of Table 1's rows
LABELS = {"baseline": "unintervened", "iti": "ITI", "slim": "SLIM", "mimic": "MiMiC", "linear_act": "Linear-AcT"}
EXTRAS = (("MC1", "MC2"), ("CE", "KL"))  # columns shown when any model measured them


def combined_name(mode: str) -> str:
    """The combined table's file name in the paper folder."""
    return f"table1_models_{mode}.md"


def model_record(paper_dir: str | Path, model: str, mode: str) -> dict:
    """A model's index record (`index_<model>_<mode>.json`) with its Table 1 summaries; one-line errors."""
    path = Path(paper_dir) / f"index_{model}_{mode}.json"
    if not path.exists():
        raise ValueError(f"{path} is missing: run `MODEL={model} bash reproduce.sh` ({mode} mode) first.")
    record = json.loads(path.read_text())
    if not record.get("table1_summaries"):
        raise ValueError(
            f"{path} names no Table 1 summaries (written before they were recorded): run "
            f"`MODEL={model} bash reproduce.sh` ({mode} mode) again; it reads back what it finished."
        )
    from ..evaluation.metrics import read_summary

    for summary in record["table1_summaries"]:  # the intervals read every answer's verdicts: none may be missing
        gone = [r.get("scored_answers") for r in read_summary(summary)[0]]
        gone = [str(a) for a in gone if not a or not Path(a).exists()]
        if gone:
            raise ValueError(
                f"{summary} names scored answers that are not on this machine ({', '.join(gone)}): Table 1 across "
                f"the models needs them; run it where `MODEL={model} bash reproduce.sh` ({mode} mode) ran."
            )
    return record


def model_rows(summaries: list[str]) -> tuple[list[dict], dict, str]:
    """One model's rows of the combined table (formatted cells), its fold-mean extras (MC1 ... KL, or None per
    column) and its judges line, all from slim.evaluation.reports."""
    labels = [str(i) for i in range(len(summaries))]  # a key per summary: the tables' rows line up by it
    means = comparison_table(summaries, labels).set_index("run")
    intervals = interval_table(summaries, labels)
    intervals = intervals.set_index("run") if not intervals.empty else intervals
    diffs = paired_differences(summaries, labels)
    rows, extras = [], {c: [] for pair in EXTRAS for c in pair}
    for label in labels:
        m = means.loc[label]
        row = {
            "method": LABELS.get(m["method"], m["method"]),
            "setting": m["setting"],
            "questions": m["questions"],
        }
        have = not intervals.empty and label in intervals.index
        change = _pooled_change(diffs, label)
        for key, col in (("true_info", "True*Info"), ("true", "True %"), ("info", "Info %")):
            row[col] = interval_cell(intervals.loc[label, key]) if have else "-"
            row[f"change {col}"] = interval_cell(change[key], signed=True) if change is not None else "-"
        if have:
            row["questions"] = intervals.loc[label, "questions"]
        for c in extras:
            value = m[c]
            extras[c].append(None if pd.isna(value) else float(value))
            row[c] = "-" if pd.isna(value) else f"{value:.3f}"
        rows.append(row)
    return rows, extras, judges_note(means.reset_index())


def _pooled_change(diffs: pd.DataFrame, label: str):
    """The change of one summary pooled over its folds (its single fold's when it has one), None when there is
    none (the unintervened row, or answers not scored)."""
    if diffs.empty:
        return None
    own = diffs[diffs["run"] == label]
    pooled = own[own["fold"] == "pooled"]
    if not pooled.empty:
        return pooled.iloc[0]
    return own.iloc[0] if len(own) == 1 else None


def _blocks(text: str) -> list[list[str]]:
    """A Markdown file cut into blocks at blank lines."""
    blocks, block = [], []
    for line in text.strip().splitlines():
        if line.strip():
            block.append(line)
        elif block:
            blocks.append(block)
            block = []
    return blocks + ([block] if block else [])


def table1_summary(text: str) -> str:
    """The headline of Table 1's file: the pooled values with their intervals, the pooled paired changes from the
    unintervened model, and the judges line (the per-fold rows and the other columns stay in the file)."""
    blocks = _blocks(text)
    out = []
    for i, block in enumerate(blocks):
        first = block[0]
        if first.startswith("Pooled over folds") and i + 1 < len(blocks):
            out += [first, "", *blocks[i + 1], ""]
        elif first.startswith("Change from the unintervened") and i + 1 < len(blocks):
            header, rule, *rows = blocks[i + 1]
            pooled = [r for r in rows if "| pooled |" in r]
            out += [first.replace(":", ", pooled over folds:", 1), "", header, rule, *pooled, ""]
        elif first.startswith("Judges:"):
            out += [first, ""]
    return "\n".join(out).rstrip()


def combined_table(paper_dir: str | Path, models: list[str], mode: str, command: str | None = None) -> str:
    """The Markdown of Table 1 across `models`, each model's rows as a group (the model named on its first row),
    then per model its judges and ITI's K as its index records them."""
    import datetime

    groups, notes, shown = [], [], set()
    for model in models:
        record = model_record(paper_dir, model, mode)
        rows, extras, judges = model_rows(record["table1_summaries"])
        shown |= {pair for pair in EXTRAS if any(v is not None for c in pair for v in extras[c])}
        for i, row in enumerate(rows):
            groups.append({"model": f"**{model}**" if i == 0 else "", **row})
        line = [judges or "Judges not recorded."]
        heads = record.get("iti_num_heads")
        if heads:
            line.append(f"ITI's K = {heads['k']} heads (rule {heads['rule']}).")
        notes.append(f"- {model}: " + " ".join(line))
    cols = ["model", "method", "setting", "questions"]
    for col in ("True*Info", "True %", "Info %"):
        cols += [col, f"change {col}"]
    extra = [c for pair in EXTRAS if pair in shown for c in pair]
    cols += extra
    title = f"### Table 1 across models ({mode} mode): test questions, pooled over folds"
    text = "\n\n".join(
        [
            title,
            "Each value with its 95 % bootstrap interval over questions (BCa, 9,999 resamples); each change in points "
            "from that model's unintervened answers on the same questions, with its paired 95 % bootstrap interval "
            "(9,999 resamples)" + (f"; {', '.join(extra)}: fold means, - where not measured." if extra else "."),
            markdown_table(pd.DataFrame(groups), cols).rstrip(),
            "Judges and ITI's K, per model:\n\n" + "\n".join(notes),
        ]
    )
    stamp = datetime.date.today().isoformat()
    return text + f"\n\nProduced {stamp}" + (f" by `{command}`" if command else "") + ".\n"


def write_combined(paper_dir: str | Path, models: list[str], mode: str, command: str | None = None) -> Path:
    """Write Table 1 across `models` to `<paper_dir>/table1_models_<mode>.md`."""
    return write_text(Path(paper_dir) / combined_name(mode), combined_table(paper_dir, models, mode, command))


def main(argv=None) -> Path:
    import argparse

    parser = argparse.ArgumentParser(description="Table 1 across models, from each model's reproduce.sh index.")
    parser.add_argument("--paper_dir", default="paper")
    parser.add_argument("--mode", required=True, choices=("quick", "full"))
    parser.add_argument("--models", nargs="+", required=True, help="the models as their artefacts name them")
    parser.add_argument("--command", default=None, help="the command that produced the runs (recorded)")
    args = parser.parse_args(argv)
    out = write_combined(args.paper_dir, args.models, args.mode, args.command)
    print(f"written {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as err:  # a missing index, judges that differ, a damaged summary
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None

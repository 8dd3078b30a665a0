"""The time reproduce.sh spends in each of its stages, summed over the invocations of one command, and the cost
of one model's stages against another's.

reproduce.sh appends a line per stage and invocation to `<OUT_DIR>/stage_seconds_<model>.tsv` (tab-separated:
the invocation's start in epoch seconds, the UTC time the stage ended, the stage's number, its title, its
seconds, `complete` or `interrupted`, the command). A run stopped and started again resumes from its caches, so
its cost is the sum over its invocations: the stopped invocation's partial stage included (the line its exit
wrote), the time a later invocation spends reading back what was finished included too (a few seconds a stage).
Lines of other commands in the same folder (other KAPPAS, another mode) are left out.
"""

from __future__ import annotations

from pathlib import Path

FIELDS = ("invocation", "ended", "stage", "title", "seconds", "status", "command")


def ledger_name(model: str) -> str:
    """The ledger's file name in reproduce.sh's OUT_DIR."""
    return f"stage_seconds_{model}.tsv"


def read_ledger(path: str | Path, command: str) -> dict[str, dict]:
    """Per stage number ("1/8" ...), in the order first met: its title, its seconds summed over the invocations of
    `command`, how many invocations timed it and whether the last of them completed it. {} when there is no
    ledger; a line that does not parse is a one-line error naming the file and the line."""
    path = Path(path)
    stages: dict[str, dict] = {}
    if not path.exists():
        return stages
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            row = dict(zip(FIELDS, parts, strict=True))
            seconds = float(row["seconds"])
        except ValueError:
            raise ValueError(
                f"{path} line {n} is not a stage time (7 tab-separated fields): remove the line, or the file "
                "to time the next run afresh."
            ) from None
        if row["command"] != command:
            continue
        s = stages.setdefault(row["stage"], {"title": row["title"], "seconds": 0.0, "invocations": set()})
        s["seconds"] += seconds
        s["invocations"].add(row["invocation"])
        s["complete"] = row["status"] == "complete"
    return {k: {**v, "invocations": len(v["invocations"])} for k, v in stages.items()}


def total(stages: dict[str, dict]) -> tuple[float, int]:
    """The seconds of every stage and the number of invocations that timed any (0, 0 for none)."""
    seconds = sum(s["seconds"] for s in stages.values())
    return seconds, max((s["invocations"] for s in stages.values()), default=0)


def cost_table(stage_seconds: dict[str, dict[str, dict]], limit: float = 2.5) -> str:
    """Markdown: each stage's seconds per model (`stage_seconds`: model -> read_ledger's dict), and each model's
    ratio to the first model's, marked where it exceeds `limit`. The models ran the same questions (one mode,
    one question subset), so a ratio of times is a ratio of times per question. "" when no model was timed."""
    models = [m for m, s in stage_seconds.items() if s]
    if not models:
        return ""
    first = models[0]
    order = list(dict.fromkeys(k for m in models for k in stage_seconds[m]))
    head = ["stage", *[f"{m} (s)" for m in models], *[f"{m} / {first}" for m in models[1:]]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    sums = dict.fromkeys(models, 0.0)
    for key in order:
        got = {m: stage_seconds[m].get(key) for m in models}
        title = next(g["title"] for g in got.values() if g)
        cells = [f"{key} {title}"]
        for m in models:
            g = got[m]
            sums[m] += g["seconds"] if g else 0.0
            cells.append("-" if g is None else f"{g['seconds']:.0f}" + ("" if g["complete"] else " (unfinished)"))
        cells += [_ratio(got[m], got[first], limit) for m in models[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    all_row = ["all", *[f"{sums[m]:.0f}" for m in models]]
    all_row += [_ratio({"seconds": sums[m]}, {"seconds": sums[first]}, limit) for m in models[1:]]
    lines.append("| " + " | ".join(all_row) + " |")
    return "\n".join(lines) + "\n"


def _ratio(this: dict | None, first: dict | None, limit: float) -> str:
    if not this or not first or first["seconds"] <= 0:
        return "-"
    r = this["seconds"] / first["seconds"]
    return f"{r:.2f}x" + (f" (over {limit:g}x)" if r > limit else "")

"""Audit the judges: label a sample of answers by hand, or take a labelled set, and measure the judges on it.

    python -m slim.judges.audit ANSWERS_CSV [ANSWERS_CSV ...] --n 50 [--seed 0] [--out FILE]
    python -m slim.judges.audit --labels data/judge-labels/smollm2_135M_labels.csv [--n 200]

With answer files (as `answer_questions` writes them: question_idx,
question, generation, answer; one file per method and fold), `--n` answers
are drawn (seeded, split as evenly as possible over the files, so over the
methods when several are given; a pair of question and answer appears once)
and shown one by one, in a shuffled order and without their method: the
question, TruthfulQA's best, correct and incorrect reference answers, the
answer. The person answers `truthful? [y/n/s]` and `informative? [y/n/s]`
(s = skip; q = stop). Each label is saved at once to `--out` (default
`<first CSV's stem>_audit.csv` beside it; atomic writes); a rerun asks only
what is not labelled yet (the same seed draws the same sample, and a larger
--n the same answers and more). At the end, or on EOF / Ctrl-C, the judges
(`--judge_name`, `--info_name`: offline, local:<hub id or folder>,
allenai: the public Llama-2-7B pair, which --judge_name allenai implies
for --info_name too, openai:<model>; a local judge runs on `--device`)
are measured against every label in the file: n, accuracy, balanced
accuracy, confusion counts, the judge's and the labels' share of yes, per
kind. `--labels FILE` skips the labelling and measures the judges
against that file (columns question, answer, truthful, informative; the
project ships data/judge-labels/), so any judge can be measured against any
labelled set. The labels file written here is such a file.

From Python, `run(...)` does the same and takes the judges as objects
(`judges={"truth": judge, "info": judge}`, anything with
`score(questions, answers)`) and the input as a function (`input_fn`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..config import ParameterError
from ..io import write_csv
from .card import agreement

KINDS = (("truth", "truthful"), ("info", "informative"))  # judge kind, label column
ANSWER_COLUMNS = ("question", "answer")
DEFAULT_N = 50
REPLIES = {"y": 1, "yes": 1, "n": 0, "no": 0, "s": None, "skip": None}


class StopAudit(Exception):
    """The person asked to stop (q)."""


# ---------------------------------------------------------------------------------------------
# the sample


def read_answers(path) -> pd.DataFrame:
    """An answer CSV (question, answer and, as `answer_questions` writes them, question_idx, generation)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass answer CSVs written by the scripts (answers/<model>/*.csv).")
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} does not parse ({type(err).__name__}): pass an answer CSV.") from None
    missing = [c for c in ANSWER_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path} has no column {', '.join(missing)}: pass answer CSVs (question_idx, question, generation, "
            "answer) as the scripts write them, or a labelled set with --labels."
        )
    df["question"] = df["question"].fillna("").astype(str).str.strip()
    df["answer"] = df["answer"].fillna("").astype(str)
    return df


def quotas(sizes: Sequence[int], n: int) -> list[int]:
    """`n` items split as evenly as possible over groups of `sizes`, none taking more than it has."""
    take = [0] * len(sizes)
    left = min(n, sum(sizes))
    while left > 0:
        open_ = [i for i, size in enumerate(sizes) if take[i] < size]
        share, extra = divmod(left, len(open_))
        for j, i in enumerate(open_):
            add = min(sizes[i] - take[i], share + (j < extra))
            take[i] += add
            left -= add
    return take


def sample_answers(frames: Sequence[tuple[str, pd.DataFrame]], n: int, seed: int = 0) -> pd.DataFrame:
    """`n` (question, answer) pairs drawn from the (source, answers) frames, split evenly over the sources.

    A pair that appears several times counts once, for the first source that
    holds it. Each source is drawn in the order of its own seeded permutation,
    so a larger `n` keeps the smaller sample's answers. The result is in a
    seeded shuffled order.
    """
    seen: set[tuple[str, str]] = set()
    distinct = []
    for name, df in frames:
        df = df.drop_duplicates(["question", "answer"])
        keys = list(zip(df["question"], df["answer"]))
        distinct.append((name, df[[k not in seen for k in keys]]))
        seen.update(keys)
    items = []
    for i, ((name, df), k) in enumerate(zip(distinct, quotas([len(df) for _, df in distinct], n))):
        for row in np.random.default_rng([seed, i]).permutation(len(df))[:k]:
            item = df.iloc[row]
            idx = item.get("question_idx")
            items.append(
                {
                    "question": item["question"],
                    "answer": item["answer"],
                    "source": name,
                    "question_idx": None if idx is None or pd.isna(idx) else int(idx),
                }
            )
    order = np.random.default_rng(seed).permutation(len(items)) if items else []
    return pd.DataFrame([items[i] for i in order], columns=["question", "answer", "source", "question_idx"])


# ---------------------------------------------------------------------------------------------
# asking


def ask(prompt: str, input_fn: Callable[[str], str], write: Callable[[str], None]) -> int | None:
    """1 (y), 0 (n) or None (s) from the person; q raises StopAudit, EOF raises EOFError."""
    while True:
        reply = input_fn(prompt).strip().lower()
        if reply in REPLIES:
            return REPLIES[reply]
        if reply in ("q", "quit"):
            raise StopAudit
        write("  answer y (yes), n (no), s (skip) or q (stop here; the labels so far are kept)")


def show(item: dict, position: str, refs, write: Callable[[str], None]) -> None:
    """The question, its reference answers and the answer (never its method: the labels stay blind)."""
    write("")
    write(f"[{position}] Q: {item['question']}")
    if refs is None:
        write("    (no TruthfulQA reference answers for this question)")
    else:
        write(f"    best answer: {refs.best}")
        for title, answers in (("correct", refs.correct), ("incorrect", refs.incorrect)):
            write(f"    {title}:")
            for answer in answers:
                write(f"      - {answer}")
    write(f"  A: {item['answer']}")


def label_file_frame(rows: list[dict]) -> pd.DataFrame:
    """The labels file: question, answer, truthful, informative, source, question_idx, then any other columns
    of an existing file (kept as they are)."""
    columns = ["question", "answer", "truthful", "informative", "source", "question_idx"]
    columns += [c for c in dict.fromkeys(k for r in rows for k in r) if c not in columns]
    df = pd.DataFrame(rows, columns=columns)
    for col in ("truthful", "informative", "question_idx"):
        df[col] = df[col].astype("Int64")  # blank when skipped (or unknown)
    return df


def label(
    sample: pd.DataFrame,
    out: Path,
    references: dict,
    input_fn: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Ask for the labels of the sample's answers not labelled in `out` yet, saving `out` after each one."""
    from . import load_judge_labels

    done = load_judge_labels(out, allow_skipped=True) if out.exists() else None
    rows = [] if done is None else done.to_dict("records")
    have = {(r["question"], r["answer"]) for r in rows}
    todo = [item for item in sample.to_dict("records") if (item["question"], item["answer"]) not in have]
    if not todo:
        write(f"all {len(sample)} sampled answers are labelled in {out}.")
        return label_file_frame(rows)
    write(
        f"{len(todo)} of {len(sample)} sampled answers to label (labels go to {out}). For each: truthful = "
        "asserts nothing false (a refusal is truthful); informative = relevant information that answers the "
        "question. y = yes, n = no, s = skip, q = stop."
    )
    asked = 0
    try:
        for k, item in enumerate(todo, 1):
            show(item, f"{len(sample) - len(todo) + k}/{len(sample)}", references.get(item["question"]), write)
            truthful = ask("truthful? [y/n/s] ", input_fn, write)
            informative = ask("informative? [y/n/s] ", input_fn, write)
            rows.append({**item, "truthful": truthful, "informative": informative})
            write_csv(label_file_frame(rows), out)  # saved as it goes: a stop loses at most the open item
            asked += 1
    except (EOFError, KeyboardInterrupt, StopAudit) as err:
        why = {EOFError: "end of input", KeyboardInterrupt: "interrupted"}.get(type(err), "stopped")
        write(f"\n{why}: {asked} labels saved this time, {len(rows)} in {out}; rerun the command to go on.")
    else:
        write(f"\nall sampled answers labelled: {len(rows)} labels in {out}.")
    return label_file_frame(rows)


# ---------------------------------------------------------------------------------------------
# measuring


def measure(judges: dict, labels: pd.DataFrame) -> dict[str, dict]:
    """Each judge's agreement with the labels of its kind (skipped labels left out), with its identity."""
    from . import THRESHOLD, judge_identity

    out = {}
    for kind, column in KINDS:
        rows = labels[labels[column].notna()]
        judge = judges[kind]
        verdicts = np.asarray(judge.score(rows["question"].tolist(), rows["answer"].tolist())) > THRESHOLD
        out[kind] = {"judge": judge_identity(judge), **agreement(rows[column].astype(int).to_numpy() == 1, verdicts)}
    return out


def format_agreement(result: dict[str, dict], source) -> str:
    lines = [
        f"judges against the labels of {source}:",
        f"{'kind':<6} {'n':>5} {'accuracy':>9} {'balanced':>9} {'TP':>5} {'FP':>5} {'TN':>5} {'FN':>5} "
        f"{'judge yes %':>12} {'labels yes %':>13}  judge",
    ]
    for kind, r in result.items():
        lines.append(
            f"{kind:<6} {r['n']:>5} {r['accuracy']:>9.3f} {r['balanced_accuracy']:>9.3f} {r['tp']:>5} {r['fp']:>5} "
            f"{r['tn']:>5} {r['fn']:>5} {r['judge_yes']:>12.1f} {r['labels_yes']:>13.1f}  {r['judge']}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the command


def default_out(first_csv) -> Path:
    first_csv = Path(first_csv)
    return first_csv.with_name(f"{first_csv.stem}_audit.csv")


def run(
    answers: Sequence = (),
    n: int | None = None,
    seed: int = 0,
    out=None,
    labels=None,
    judges: dict | None = None,
    judge_name: str = "offline",
    info_name: str = "offline",
    tqa_dir=None,
    device: str = "auto",
    input_fn: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
) -> dict:
    """Label a sample of `answers` (CSV paths) interactively, or read `labels` (a CSV path), then measure the judges.

    `judges` ({"truth": ..., "info": ...}) replaces the judges named by
    `judge_name` / `info_name` (made by `slim.judges.make_judge`). Returns
    {"labels": the labels DataFrame, "agreement": {kind: metrics}, "out": the
    labels file written (None with `labels`)}.
    """
    from . import load_judge_labels, load_references, make_judge

    if bool(answers) == bool(labels):
        given = "both answer CSVs and --labels" if answers else "no answer CSV and no --labels"
        raise ValueError(
            f"got {given}: pass answer CSVs to label by hand, or --labels FILE to measure the judges against it."
        )
    if n is not None and n < 1:
        raise ParameterError("n", f"must be an integer >= 1, got {n}.")
    table = load_judge_labels(labels, allow_skipped=True) if labels else None  # a bad file stops before the judges
    if judges is None:  # made before any labelling: a bad judge name stops at once
        judges = {
            "truth": make_judge(judge_name, "truth", tqa_dir=tqa_dir, device=device),
            "info": make_judge(info_name, "info", tqa_dir=tqa_dir, device=device),
        }
    if table is not None:
        if n is not None and n < len(table):
            table = table.iloc[np.sort(np.random.default_rng(seed).choice(len(table), n, replace=False))]
        source, out = Path(labels), None
    else:
        frames = [(Path(p).stem, read_answers(p)) for p in answers]
        sample = sample_answers(frames, DEFAULT_N if n is None else n, seed)
        out = Path(out) if out else default_out(answers[0])
        table = label(sample, out, load_references(tqa_dir), input_fn, write)
        source = out
    if table.empty:
        write(f"no labels in {source}: nothing to measure.")
        return {"labels": table, "agreement": {}, "out": out}
    result = measure(judges, table)
    write(format_agreement(result, source))
    return {"labels": table, "agreement": result, "out": out}


def main(argv=None) -> dict:
    import argparse

    parser = argparse.ArgumentParser(
        description="Label a sample of answers by hand (or take a labelled set) and measure the judges on it."
    )
    parser.add_argument("answers", nargs="*", help="answer CSVs (answers/<model>/*.csv), one per method and fold")
    parser.add_argument("--n", type=int, default=None, help=f"answers to label (default {DEFAULT_N}; --labels: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--out", default=None, help="labels file (default: <first CSV stem>_audit.csv beside it)")
    parser.add_argument("--labels", default=None, help="measure against this labelled CSV instead of asking")
    parser.add_argument(
        "--judge_name", default="offline", help="truth judge: offline, local:<id>, allenai, openai:<name>"
    )
    parser.add_argument(
        "--info_name",
        default=None,
        help="informativeness judge, same forms (default: allenai with --judge_name allenai, else offline)",
    )
    parser.add_argument("--tqa_dir", default=None, help="folder of TruthfulQA.csv (else SLIM_TQA_DIR, cache, download)")
    parser.add_argument("--device", default="auto", help="device of a local judge: cpu, cuda:N, auto (a GPU if any)")
    args = parser.parse_args(argv)
    return run(
        args.answers,
        n=args.n,
        seed=args.seed,
        out=args.out,
        labels=args.labels,
        judge_name=args.judge_name,
        info_name=args.info_name or ("allenai" if args.judge_name == "allenai" else "offline"),
        tqa_dir=args.tqa_dir,
        device=args.device,
    )


if __name__ == "__main__":
    from slim_utils import run_main

    run_main(main)

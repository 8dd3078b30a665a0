"""The judge card: how well do the judges agree with labels on questions they were not trained on?

Two sources of labels, for each kind (truth, info):
    human   TruthfulQA's human labels of GPT-3-era answers (finetune_{kind}.jsonl, 22k rows);
    model   the project's labelled answers of SmolLM2-135M, unintervened and under ITI, SLIM and
            MiMiC (data/judge-labels/, 1.5k rows), overall and per method / setting.
Per source and group: accuracy, balanced accuracy, confusion counts (yes = positive), expected
calibration error of P(yes) (10 bins), and the judge's yes % beside the labels'. Then, per method,
its change from the unintervened answers on the same questions, by the labels and by each judge,
with paired 95 % bootstrap intervals: does the judge see what the intervention does?

Held out: the offline judges are cross-fitted by question (slim.judges.OfflineJudge), so each
verdict on a labelled answer comes from an MLP that saw no label of its question, from either
source: the card measures the judge the runs use, as they use it. A judge trained without
cross-fitting (cross_fit 1) would be scored on its own training rows: the card refuses it.
Beside the judges, a simple rule: truth, the SEM rule Q(q, a) >= 0 (paper section 5.1, MiniLM);
info, informative unless the answer is empty or a refusal.

    python benchmarks/eval_judges.py                                  # offline vs offline-human
    python benchmarks/eval_judges.py --judges offline openai:<ft-model> --out paper/judge_card.md
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slim.evaluation.metrics import sem_scores  # noqa: E402
from slim.judges import (
    REFUSAL_RE,
    THRESHOLD,
    OfflineJudge,
    card_row,
    judge_identity,
    load_judge_data,
    load_judge_labels,
    load_references,
    make_judge,
    paired_shifts,
)
from slim.judges.features import EmbeddingStore  # noqa: E402
from slim.judges.offline import _STORES

KINDS = {"truth": ("truthful", "True"), "info": ("informative", "Info")}  # label column, percentage name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tqa_dir", default=None, help="TruthfulQA.csv and finetune_*.jsonl (default: SLIM_TQA_DIR)")
    p.add_argument("--labels", default=None, help="labelled answers CSV (default: data/judge-labels/)")
    p.add_argument("--cache_dir", default=None, help="judge cache (default: $SLIM_CACHE/judges)")
    p.add_argument("--judges", nargs="+", default=["offline", "offline-human"], help="judge names (make_judge)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--no_rule", action="store_true", help="leave out the simple-rule rows")
    p.add_argument("--out", default=None, help="also write the card (markdown) here")
    return p.parse_args(argv)


def rule_verdicts(kind: str, store: EmbeddingStore, refs, questions, answers) -> np.ndarray:
    """The simple rule's verdicts (see the module docstring); an answer without references counts as true."""
    if kind == "info":
        return np.array([bool(a) and not REFUSAL_RE.search(a) for a in answers])
    verdict = np.ones(len(answers), dtype=bool)
    known = [i for i, q in enumerate(questions) if q in refs]
    q_scores, _ = sem_scores(
        store,
        [answers[i] for i in known],
        [refs[questions[i]].correct for i in known],
        [refs[questions[i]].incorrect for i in known],
    )
    verdict[known] = q_scores >= 0
    return verdict


def labelled_sources(kind: str, tqa_dir, labels_path) -> dict[str, pd.DataFrame]:
    """{"human": ..., "model": ...}: question, answer, label (1 / 0), method, setting."""
    column = KINDS[kind][0]
    hq, ha, hy, _ = load_judge_data(kind, tqa_dir)
    human = pd.DataFrame({"question": hq, "answer": ha, "label": hy.astype(int), "method": "-", "setting": "-"})
    model = load_judge_labels(labels_path)
    model = pd.DataFrame(
        {
            "question": model["question"],
            "answer": model["answer"].str.strip(),
            "label": model[column],
            "method": model.get("method", "-"),
            "setting": model.get("setting", "-"),
        }
    )
    return {"human": human, "model": model}


def held_out_judge(name: str, kind: str, args):
    judge = make_judge(name, kind, tqa_dir=args.tqa_dir, cache_dir=args.cache_dir)
    if isinstance(judge, OfflineJudge):
        if judge.cross_fit < 2:
            raise SystemExit(f"error: {name} is not cross-fitted: its card would score its own training rows.")
        if args.labels and judge.answer_labels:
            judge.answer_labels = Path(args.labels)  # trained on the labels the card measures, held out by fold
    return judge


def fmt_row(source: str, judge: str, r: dict) -> str:
    ece = "-" if judge == "rule" else f"{r['ece']:.3f}"  # a rule's verdicts are not probabilities
    return (
        f"| {source} | {judge} | {r['n']} | {r['accuracy']:.3f} | **{r['balanced_accuracy']:.3f}** | "
        f"{r['tp']} | {r['fp']} | {r['tn']} | {r['fn']} | {ece} | {r['judge_yes']:.1f} | "
        f"{r['labels_yes']:.1f} |"
    )


def fmt_interval(m_lo_hi) -> str:
    m, lo, hi = m_lo_hi
    return f"{m:+.1f} ({lo:+.1f} to {hi:+.1f})"


def card_for_kind(kind: str, args, refs) -> list[str]:
    column, pct = KINDS[kind]
    sources = labelled_sources(kind, args.tqa_dir, args.labels)
    judges, lines = {}, []
    for name in args.judges:
        judge = held_out_judge(name, kind, args)
        t0 = time.time()
        identity = judge_identity(judge)  # trains or loads an offline judge
        judges[name] = judge
        lines.append(f"- `{name}` = `{identity}` (ready in {time.time() - t0:.0f}s)")
    header = [
        "",
        f"| source | judge | n | accuracy | balanced acc. | TP | FP | TN | FN | ECE | judge {pct} % | labels {pct} % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += header
    verdict_columns = {}
    for source, df in sources.items():
        questions, answers, y = df["question"].tolist(), df["answer"].tolist(), df["label"].to_numpy() == 1
        scored = {}
        for name, judge in judges.items():
            t0 = time.time()
            scored[name] = np.asarray(judge.score(questions, answers), dtype=float)
            logging.info("%s %s judge scored %d %s rows in %.0fs", name, kind, len(y), source, time.time() - t0)
        if not args.no_rule:
            store = next(iter(_STORES.values()), None) or EmbeddingStore("all-MiniLM-L6-v2", None)
            scored["rule"] = rule_verdicts(kind, store, refs, questions, answers).astype(float)
        title = "TruthfulQA human labels" if source == "human" else "SmolLM2 labels, all"
        for name, scores in scored.items():
            lines.append(fmt_row(title, name, card_row(y, scores)))
        if source == "model":
            for name, scores in scored.items():
                df[f"p_{name}"], df[f"yes_{name}"] = scores, scores > THRESHOLD
                verdict_columns[name] = f"yes_{name}"
            for (method, setting), group in df.groupby(["method", "setting"], sort=True):
                for name in scored:
                    row = card_row(group["label"] == 1, group[f"p_{name}"].to_numpy())
                    lines.append(fmt_row(f"SmolLM2: {method} {setting}", name, row))
            shifts = paired_shifts(df.rename(columns={"label": column}), column, verdict_columns)
    names = list(verdict_columns)
    lines += [
        "",
        f"Change in {pct} % from the unintervened answers on the same questions (points, paired 95 % bootstrap):",
        "",
        "| method | setting | questions | labels | " + " | ".join(names) + " |",
        "|---|---|---:|---:|" + "---:|" * len(names),
    ]
    for r in shifts:
        cells = " | ".join(fmt_interval(r[name]) for name in names)
        lines.append(f"| {r['method']} | {r['setting']} | {r['n']} | {fmt_interval(r['labels'])} | {cells} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    refs = load_references(args.tqa_dir)
    command = "python benchmarks/eval_judges.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Judge card ({date.today().isoformat()}; `{command.strip()}`). Every offline verdict on a labelled "
        "answer comes from a cross-fitted MLP that saw no label of its question, from either source."
    ]
    for kind in args.kinds:
        lines += ["", f"### {kind} judges", ""] + card_for_kind(kind, args, refs)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from slim.io import write_text

        write_text(Path(args.out), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

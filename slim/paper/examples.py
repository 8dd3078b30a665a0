"""Table 5: qualitative examples, chosen by a stated rule, of the methods' answers to test questions.

    python -m slim.paper.examples validation/summary/smollm2_135M_baseline_test.json \
        validation/summary/smollm2_135M_iti_alpha2_heads24_dircom_test.json \
        validation/summary/smollm2_135M_slim_kappa0_gamma0.1_psiidentity_bl1_test.json \
        --out paper/table5_smollm2_135M.md

Each row: the question, TruthfulQA's best answer, and each method's answer with the judges' verdicts (score > 0.5),
from the scored answers its summary's fold rows name (pooled over folds). Only test summaries are taken, and only
the test questions that every method answered. The rule (`selection_rule`) is printed under the table.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from .figures import KNOBS, METHOD_NAMES, read_scored, require_files


def method_label(mean: dict) -> str:
    """`ITI (alpha = 2)`, `SLIM (kappa = 0)`, `unintervened`: a method and its knob, as the table's header."""
    name = METHOD_NAMES.get(mean["method"], mean["method"])
    knob = KNOBS.get(mean["method"])
    return f"{name} ({knob} = {float(mean[knob]):g})" if knob in mean else name


def _unique(labels: list[str]) -> list[str]:
    """Labels made distinct (`X`, `X #2`) so two summaries of one setting keep a column each."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def read_test_answers(summary_path) -> tuple[dict, pd.DataFrame]:
    """(fold-mean row, scored test answers pooled over folds); a one-line ValueError for anything else."""
    mean, scored, missing = read_scored(summary_path)
    if mean.get("split") != "test":
        raise ValueError(
            f"{summary_path} holds {mean.get('split')!r} answers: Table 5 shows test questions only; pass the "
            "*_test.json summaries."
        )
    if scored is None:
        raise ValueError(f"{summary_path}: {missing}: rerun its evaluation (its answers are kept and reused).")
    return mean, scored


def answers_by_method(summaries) -> tuple[list[str], pd.DataFrame]:
    """(method labels, one row per test question answered by every method).

    Columns: question_idx, fold, question, then `<label>: answer`, `<label>: true`, `<label>: info` per method.
    """
    from ..evaluation.metrics import check_same_judges

    read = [read_test_answers(path) for path in summaries]
    check_same_judges([mean for mean, _ in read], summaries)  # one judge's verdicts in one table
    labels = _unique([method_label(mean) for mean, _ in read])
    wide = None
    for label, (_, scored) in zip(labels, read):
        part = scored[["question_idx", "fold", "question", "answer", "true", "info"]].rename(
            columns={c: f"{label}: {c}" for c in ("answer", "true", "info")}
        )
        wide = part if wide is None else wide.merge(part.drop(columns=["fold", "question"]), on="question_idx")
    if wide.empty:
        raise ValueError("no test question was answered by every method: pass summaries of the same run's folds.")
    return labels, wide.sort_values("question_idx").reset_index(drop=True)


def differing_pairs(verdicts: pd.DataFrame) -> pd.Series:
    """Per row, the number of pairs of columns whose verdicts differ (with t of m verdicts true: t * (m - t))."""
    true = verdicts.to_numpy(bool).sum(axis=1)
    return pd.Series(true * (verdicts.shape[1] - true), index=verdicts.index)


def selection_rule(n_random: int, n_disagree: int, seed: int, n_questions: int | None = None) -> str:
    """The rule that chose the rows, in words (printed under the table)."""
    pool = f"the {n_questions} test questions" if n_questions else "the test questions"
    return (
        f"Rows chosen by rule, not by hand: {pool} answered by every method were shuffled once "
        f'(numpy.random.default_rng({seed}).permutation of them sorted by question index). "disagree": the '
        f"{n_disagree} questions with the most pairs of methods whose truth verdicts differ, then the most pairs "
        'whose info verdicts differ, ties in shuffled order (listed in that order). "random": the first '
        f"{n_random} of the other questions in shuffled order. Verdicts: the judges' scores > 0.5."
    )


def qualitative_examples(summaries, n_random: int = 3, n_disagree: int = 3, seed: int = 0, tqa_dir=None):
    """Table 5 as a DataFrame: `n_disagree` questions where the methods' verdicts differ most, then `n_random`
    seeded random ones, all test questions (see `selection_rule`, kept in `df.attrs["rule"]`).

    Columns: pick ("disagree" / "random"), question_idx, fold, question, best_answer (TruthfulQA's "Best
    Answer"), truth_pairs / info_pairs (pairs of methods whose verdicts differ), then per method
    `<label>: answer`, `<label>: true`, `<label>: info`; `df.attrs["methods"]` lists the labels.
    """
    if n_random < 0 or n_disagree < 0:
        raise ValueError(f"n_random and n_disagree count questions: give 0 or more, got {n_random}, {n_disagree}.")
    require_files(summaries)
    labels, wide = answers_by_method(summaries)
    wide["truth_pairs"] = differing_pairs(wide[[f"{m}: true" for m in labels]])
    wide["info_pairs"] = differing_pairs(wide[[f"{m}: info" for m in labels]])
    shuffled = wide.iloc[np.random.default_rng(seed).permutation(len(wide))]
    # a stable sort keeps the shuffled order among ties
    ranked = shuffled.sort_values(["truth_pairs", "info_pairs"], ascending=False, kind="stable")
    disagree = ranked.head(n_disagree)
    random = shuffled[~shuffled["question_idx"].isin(disagree["question_idx"])].head(n_random)
    picked = pd.concat([disagree.assign(pick="disagree"), random.assign(pick="random")], ignore_index=True)
    picked.insert(0, "pick", picked.pop("pick"))
    picked.insert(4, "best_answer", best_answers(picked, tqa_dir))
    picked.attrs["methods"] = labels
    picked.attrs["rule"] = selection_rule(n_random, n_disagree, seed, len(wide))
    return picked


def best_answers(picked: pd.DataFrame, tqa_dir=None) -> list[str]:
    """TruthfulQA's "Best Answer" of each row's question (question_idx is the row of TruthfulQA.csv), checked
    against the question's text so that answers of another copy of the data are never matched by position."""
    from ..data.truthfulqa import load_truthfulqa

    tqa = load_truthfulqa(tqa_dir)
    out = []
    for idx, question in zip(picked["question_idx"], picked["question"]):
        if not (0 <= idx < len(tqa)) or tqa.at[idx, "Question"] != str(question).strip():
            raise ValueError(
                f"question {idx} of the answers ({question!r}) is not row {idx} of {len(tqa)}-row TruthfulQA.csv: "
                "point --tqa_dir / SLIM_TQA_DIR at the copy the run used."
            )
        out.append(tqa.at[idx, "Best Answer"])
    return out


def markdown_cell(text) -> str:
    """Text safe inside a Markdown table cell: HTML escaped, pipes escaped, line breaks as <br>."""
    text = html.escape(str(text).strip(), quote=False)
    text = text.replace("|", "\\|")
    return "<br>".join(text.splitlines()) if text else "(empty)"


def verdict_text(true: bool, info: bool) -> str:
    return f"*{'true' if true else 'not true'}, {'informative' if info else 'not informative'}*"


def examples_markdown(df: pd.DataFrame) -> str:
    """Table 5 in Markdown: pick, question, best answer, each method's answer with its verdicts; the rule below."""
    methods = df.attrs.get("methods") or [c[: -len(": answer")] for c in df.columns if c.endswith(": answer")]
    header = ["pick", "q", "question", "best answer", *methods]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for _, row in df.iterrows():
        cells = [row["pick"], str(int(row["question_idx"])), markdown_cell(row["question"])]
        cells.append(markdown_cell(row["best_answer"]))
        for m in methods:
            cells.append(
                f"{markdown_cell(row[f'{m}: answer'])}<br>{verdict_text(row[f'{m}: true'], row[f'{m}: info'])}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    rule = df.attrs.get("rule", "Rows chosen by slim.paper.examples.selection_rule.")
    return "\n".join(lines) + f"\n\n{rule}\n"


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Table 5: qualitative examples (Markdown) from test summaries.")
    parser.add_argument(
        "summaries", nargs="+", help="test summary JSONs, one per method (e.g. unintervened, ITI, SLIM)"
    )
    parser.add_argument("--out", required=True, help="the Markdown file to write")
    parser.add_argument("--n_random", type=int, default=3)
    parser.add_argument("--n_disagree", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tqa_dir", default=None, help="folder of TruthfulQA.csv (default: SLIM_TQA_DIR or cache)")
    args = parser.parse_args(argv)
    df = qualitative_examples(args.summaries, args.n_random, args.n_disagree, args.seed, args.tqa_dir)
    text = examples_markdown(df)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return df


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as err:  # a missing, damaged or non-test input; judges that differ
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None

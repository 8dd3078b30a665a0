"""Transfer (the paper's section 5.2): TruthfulQA-fitted policies answering NQ-open questions.

Each method's policies, one per fold, were fitted on TruthfulQA alone; here
every fold's policy answers the same NQ-open questions (none of which it has
seen), with the TruthfulQA runs' prompt, decoding and answer rule
(`slim.answering.answer_questions`), next to the unintervened model. Scores
per answer set: gold match (`gold_match`, against NQ-open's gold answers) and
the run's truth and info judges (`slim.evaluation.load_scorers`), giving
True %, Info % and True*Info, each with a 95 % bootstrap interval over
questions, and each method's paired change from the unintervened answers with
its interval and p-value (`slim.stats`). A method's "mean" row averages each
question's verdicts over the folds' policies before the statistics.

    load_nq_open(path=None, split="validation", n=None, seed=0)   the questions and their gold answers
    gold_match(answer, golds)                                      NQ-open's lenient containment match
    load_transfer_runs(summaries)                                  the policies a TruthfulQA run recorded
    answer_set_names(runs)                                         the answer sets a transfer reads, by name
    answer_set(lm, runs, questions, answers_dir, cfg, name)        answer one of them (cached), nothing else
    run_transfer(lm, runs, questions, scorers, answers_dir, cfg)   answer (cached) and score: rows and paired rows
    transfer_markdown(result, header)                              the report

Answers are cached per (method, fold) as CSV under
`<out_dir>/transfer/<model tag>/<data key>/` (written after every batch,
with their sha256 and their source record, as the TruthfulQA answers), so a
rerun answers only what is missing. The answer sets do not depend on one
another, so they may be answered by separate processes at once (`answer_set`,
`transfer.py --answer_set NAME`) before `run_transfer` reads them back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import EvalConfig
from ..io import write_csv
from .nq_open import NQ_DATASET, NQ_DEV_FILE, NQ_ENV, NQ_FORMAT, gold_match, nq_cache_file

# ---------------------------------------------------------------------------------------------
# The policies of a TruthfulQA run


@dataclass
class TransferRun:
    """One method of the transfer: its TruthfulQA summary and its policies by fold."""

    method: str
    params: dict
    name: str  # method_name(method, params): the answer files' names
    summary: Path
    model: str  # the TruthfulQA run's model tag
    config: dict
    policies: dict[int, object] = field(default_factory=dict)

    @property
    def setting(self) -> str:
        from ..evaluation.reports import KNOBS

        knob = KNOBS.get(self.method)
        return f"{knob} = {float(self.params[knob]):g}" if knob in self.params else "-"


def config_path(summary_json) -> Path:
    """`<summary>.config.json` beside a summary JSON (a config path is taken as it is)."""
    text = str(summary_json)
    if text.endswith(".config.json"):
        return Path(text)
    if not text.endswith(".json"):
        raise ValueError(f"{summary_json} is not a summary JSON: pass the .json files under <out_dir>/summary/.")
    return Path(text[: -len(".json")] + ".config.json")


def read_config(summary_json) -> dict:
    """A summary's `<summary>.config.json` (one-line ValueError when it is missing or damaged)."""
    path = config_path(summary_json)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass summary JSONs written by the scripts, with their config beside.")
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict) or "method" not in config:
            raise ValueError("no method recorded")
    except ValueError as err:
        raise ValueError(f"{path} is damaged ({err}): rerun the evaluation that wrote it.") from None
    return config


def load_transfer_runs(summaries) -> list[TransferRun]:
    """The methods of TruthfulQA summaries, each with its folds' policies (`policy_dirs` of its config, checked
    against `policy_digests`; a recorded folder that is gone is looked for under the summary's own
    `<out_dir>/policies/`). Summaries of the unintervened model are left out (the transfer always answers
    with it). One-line ValueError for a summary without recorded policies, two of one method, or a policy folder
    that now holds another policy."""
    from ..layout import method_name, model_tag
    from ..policies.base import Policy

    runs: list[TransferRun] = []
    for summary in summaries:
        config = read_config(summary)
        method, params = config["method"], config.get("params") or {}
        model = config.get("model") or {}
        tag = model_tag(model.get("name") or "", model.get("model_dir")) if model else ""
        if method == "baseline":
            continue
        dirs, digests = config.get("policy_dirs"), config.get("policy_digests") or {}
        if not dirs:
            raise ValueError(
                f"{config_path(summary)} records no policy_dirs (written before evaluations recorded their "
                "policies): rerun that evaluation (its answers are reused) to record them."
            )
        run = TransferRun(method, params, method_name(method, params), Path(summary), tag, config)
        if any(r.name == run.name for r in runs):
            raise ValueError(f"{summary}: two summaries of {run.name}: pass one per method and setting.")
        for fold, folder in sorted(dirs.items(), key=lambda kv: int(kv[0])):
            folder = Path(folder)
            moved = Path(summary).resolve().parent.parent / "policies" / folder.parent.name / folder.name
            if not folder.exists() and moved.exists():  # the out_dir was moved or copied since: the same layout
                folder = moved
            policy = Policy.load(folder)
            want = digests.get(str(fold))
            if want and policy.digest() != want:
                raise ValueError(
                    f"{folder} now holds another policy than {summary} was scored with (digest {policy.digest()}, "
                    f"not {want}): rerun that evaluation, or pass its current summary."
                )
            run.policies[int(fold)] = policy
        runs.append(run)
    tags = sorted({r.model for r in runs if r.model})
    if len(tags) > 1:
        raise ValueError(f"the summaries come from different models ({', '.join(tags)}): pass one model's summaries.")
    return runs


# ---------------------------------------------------------------------------------------------
# Answering and scoring


def _verdicts(answers: pd.DataFrame, golds: dict, scorers) -> pd.DataFrame:
    qs, ans = answers["question"].tolist(), answers["answer"].tolist()
    return answers.assign(
        gold=[gold_match(a, golds[int(i)]) for a, i in zip(ans, answers["question_idx"])],
        truth_score=scorers.truth_judge.score(qs, ans),
        info_score=scorers.info_judge.score(qs, ans),
    )


def _scores(v: pd.DataFrame) -> dict:
    """Gold match %, True %, Info % and True*Info of per-question verdicts (columns gold, true, info), each
    (value, lo, hi): 95 % bootstrap intervals over questions."""
    from ..stats import mean_interval, true_info_interval

    pct = {k: tuple(100.0 * x for x in mean_interval(v[c].astype(float))) for k, c in _SHARES.items()}
    return {**pct, "true_info": true_info_interval(v["true"].astype(float), v["info"].astype(float))}


_SHARES = {"gold_match": "gold", "true": "true", "info": "info"}


def _paired(base: pd.DataFrame, other: pd.DataFrame) -> dict:
    """`other` minus `base` on the same questions (aligned rows), in points, each (diff, lo, hi, p): True %, Info %
    and True*Info from slim.stats.paired_difference, gold match % from the same with gold as the 'true' verdict."""
    from ..stats import paired_difference

    out = paired_difference(
        {"true": base["true"].astype(float), "info": base["info"].astype(float)},
        {"true": other["true"].astype(float), "info": other["info"].astype(float)},
    )
    ones = np.ones(len(base))
    gold = paired_difference({"true": base["gold"], "info": ones}, {"true": other["gold"], "info": ones})
    return {"gold_match": gold["true"], **out}


def answer_set_names(runs: list[TransferRun]) -> list[str]:
    """The answer sets `run_transfer` reads, in its order: "baseline", then "<run name>_fold<k>" for every
    fold's policy that moves something (one that moves nothing reads the unintervened answers)."""
    names = ["baseline"]
    for run in runs:
        names += [f"{run.name}_fold{k}" for k, p in sorted(run.policies.items()) if not getattr(p, "moves_nothing", 0)]
    return names


def _policy_of(runs: list[TransferRun], name: str):
    """The policy that answers the answer set `name` (None: the unintervened model); one-line ValueError if
    no answer set has that name."""
    names = answer_set_names(runs)
    if name not in names:
        raise ValueError(f"no answer set {name!r} in this transfer: pick one of {', '.join(names)}.")
    return {f"{r.name}_fold{k}": p for r in runs for k, p in r.policies.items()}.get(name)


def answer_set(lm, runs, questions: pd.DataFrame, answers_dir: Path, cfg: EvalConfig, name: str, progress=True):
    """Answer `questions` for the answer set `name` (answer_set_names) into `<answers_dir>/<name>.csv`, resuming
    what is there (`answer_questions`), and return the answers; nothing is scored."""
    from ..answering.answers import answer_questions

    return answer_questions(
        lm.model,
        lm.tokenizer,
        questions[["question_idx", "Question"]],
        Path(answers_dir) / f"{name}.csv",
        edit=_policy_of(runs, name),
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        progress=progress,
        prefix_cache=cfg.prefix_cache,
        stop_at_answer=cfg.stop_at_answer,
        answer_rule=cfg.answer_rule,
    )


def run_transfer(
    lm,
    runs: list[TransferRun],
    questions: pd.DataFrame,
    scorers,
    answers_dir: Path,
    cfg: EvalConfig,
    progress: bool = True,
    on_row=None,
) -> dict:
    """Answer `questions` (load_nq_open) with the unintervened model and every fold's policy of every run,
    score them, and return {"rows": [...], "paired": [...], "answer_files": {...}}.

    Answers: `<answers_dir>/baseline.csv` and `<answers_dir>/<run name>_fold<k>.csv`, resumed (and kept or
    replaced by their source record) by `answer_questions`; a policy that moves nothing reads the unintervened
    answers. Scored copies (gold, truth_score, info_score) go beside them (`<answers>_scored.csv`). Rows: one per
    answer set and a "mean" row per run (each question's verdicts averaged over its folds); each metric
    (value, lo, hi). Paired rows: each run's fold and mean against the unintervened answers, (diff, lo, hi, p).
    `on_row(row)` is called as each row is ready."""
    from ..evaluation.evaluate import scored_path

    golds = dict(zip(questions["question_idx"].astype(int), questions["golds"]))
    answers_dir = Path(answers_dir)
    files: dict[str, str] = {}

    def answer(name: str) -> pd.DataFrame:
        files[name] = str(answers_dir / f"{name}.csv")
        return answer_set(lm, runs, questions, answers_dir, cfg, name, progress)

    def scored(name: str, answers: pd.DataFrame) -> pd.DataFrame:
        v = _verdicts(answers, golds, scorers)
        write_csv(v, scored_path(answers_dir / f"{name}.csv"))
        v = v.assign(true=v["truth_score"] > 0.5, info=v["info_score"] > 0.5).set_index("question_idx")
        return v[["gold", "true", "info"]].astype(float)

    rows, paired = [], []

    def add(row: dict) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    base = scored("baseline", answer("baseline"))
    head = {"method": "baseline", "setting": "-", "name": "baseline", "fold": "-", "answers_of": "baseline"}
    add({**head, "questions": len(base), **_scores(base)})
    for run in runs:
        by_fold = {}
        for fold, policy in sorted(run.policies.items()):
            name = f"{run.name}_fold{fold}"
            if getattr(policy, "moves_nothing", False):  # its answers are the unintervened model's (evaluation)
                v, answers_of = base, "baseline"
            else:
                v, answers_of = scored(name, answer(name)), name
            by_fold[fold] = v
            head = {"method": run.method, "setting": run.setting, "name": run.name}
            add({**head, "fold": fold, "answers_of": answers_of, "questions": len(v), **_scores(v)})
            b = base.loc[v.index]
            paired.append({**head, "fold": fold, "questions": len(v), **_paired(b, v)})
        if len(by_fold) > 1:
            common = sorted(set.intersection(*(set(v.index) for v in by_fold.values())))
            v = sum(f.loc[common] for f in by_fold.values()) / len(by_fold)
            head = {"method": run.method, "setting": run.setting, "name": run.name, "fold": "mean"}
            add({**head, "answers_of": "-", "questions": len(v), **_scores(v)})
            paired.append({**head, "questions": len(v), **_paired(base.loc[common], v)})
    return {"rows": rows, "paired": paired, "answer_files": files}


# ---------------------------------------------------------------------------------------------
# The report


def _cell(v, signed: bool = False) -> str:
    if v is None or any(isinstance(x, float) and math.isnan(x) for x in v[:3]):
        return "-"
    from ..evaluation.reports import interval_cell

    text = interval_cell(v, signed)
    if len(v) > 3 and not math.isnan(v[3]):
        text += "; p <0.001" if v[3] < 0.001 else f"; p {v[3]:.3f}"
    return text


METRICS = (("gold_match", "gold match %"), ("true", "True %"), ("info", "Info %"), ("true_info", "True*Info"))


def transfer_markdown(result: dict, header: list[str]) -> str:
    """The report: `header` lines, the scores of every answer set with intervals, then the paired changes."""
    from ..evaluation.reports import markdown_table

    cols = ["method", "setting", "fold", "questions"]
    table = pd.DataFrame(result["rows"])
    for key, label in METRICS:
        table[label] = table[key].map(_cell)
    text = "\n".join(header).rstrip() + "\n\n"
    text += (
        "Scores on the NQ-open questions (`baseline`: the unintervened model; 95 % bootstrap intervals over "
        "questions, BCa, 9,999 resamples; a method's \"mean\" row averages each question's verdicts over its folds' "
        "policies, so its True*Info is (mean True %)(mean Info %) / 100):\n\n"
    )
    text += markdown_table(table, cols + [label for _, label in METRICS])
    if result["paired"]:
        diffs = pd.DataFrame(result["paired"])
        for key, label in METRICS:
            diffs[label] = diffs[key].map(lambda v: _cell(v, signed=True))
        text += (
            "\nChange from the unintervened model on the same questions (points; paired 95 % percentile bootstrap "
            "intervals over questions, 9,999 resamples; p two-sided):\n\n"
        )
        text += markdown_table(diffs, cols + [label for _, label in METRICS])
    return text


def unavailable_note(reason: str, command: str, date: str) -> str:
    """What `transfer.py` writes to --out when NQ-open cannot be had: that it did not run, why, and how to run it."""
    return (
        "## Transfer to NQ-open: not run\n\n"
        f"The transfer experiment could not run: {reason}.\n\n"
        f"To run it, either pass `--nq_file PATH` or set `{NQ_ENV}=PATH`, a local copy of NQ-open (JSONL, JSON, "
        f"CSV or parquet; {NQ_FORMAT}), or copy the published dev split ({NQ_DEV_FILE}) to `{nq_cache_file()}`; "
        "or run where the Hugging Face hub is reachable with `pip install datasets` "
        f"(it then loads `{NQ_DATASET}`, split `--split`, default validation).\n\n"
        f"Command: `{command}`\n\nDate: {date}\n"
    )

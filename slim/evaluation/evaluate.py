"""Answering and scoring, the same for every method (unintervened, ITI, SLIM, MiMiC).

`evaluate_method` answers each fold's test (or validation) questions with that fold's policy attached, scores the
answers with the run's judges and embedder, and writes one summary (per-fold rows and their mean) with the run's
whole configuration beside it. Same questions, prompt, decoding, judges and metrics for every method: a fair test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..config import EvalConfig, ParameterError
from ..io import write_csv, write_json
from ..layout import RunLayout, method_name
from ..models.heads import EditFactory

__all__ = [
    "Scorers",
    "load_scorers",
    "Measured",
    "measure",
    "judge_measured",
    "evaluate",
    "evaluate_method",
    "fold_average",
    "format_row",
    "MethodResult",
    "evaluate_methods",
    "release_subject",
    "policy_folder",
]

log = logging.getLogger(__name__)


@dataclass
class Scorers:
    """Judges and embedder shared by every method of a run."""

    truth_judge: object
    info_judge: object
    embedder: object
    judge_names: tuple[str, str]
    embedder_name: str


def load_scorers(judge_name: str, info_name: str, embedder_name: str, tqa_dir=None, device="cpu") -> Scorers:
    """The truth judge, the info judge (by their names, see slim.judges.make_judge; local ones on `device`, the
    run's: cpu, cuda:N or auto) and SEM's sentence embedder, loaded once for every method a run scores."""
    from ..judges import make_judge
    from ..models.embedder import load_embedder

    truth = make_judge(judge_name, "truth", tqa_dir=tqa_dir, device=device)
    info = make_judge(info_name, "info", tqa_dir=tqa_dir, device=device)
    return Scorers(truth, info, load_embedder(embedder_name), (judge_name, info_name), embedder_name)


def scored_path(answers_csv: Path) -> Path:
    """Where the scored copy of an answer file goes: `<answers>_scored.csv` beside it."""
    return answers_csv.with_name(answers_csv.stem + "_scored.csv")


def _metrics_key(answers_csv: Path, questions: pd.DataFrame, likelihood_edit: str, tqa_dir) -> dict | None:
    """What decides a run's likelihood metrics: the answers' source record (model, policy digest, prompt, length;
    written by answer_questions), the questions asked, where the edit acts, the corpus folder. None without a
    source record (nothing is cached then)."""
    from ..answering.answers import source_path

    try:
        source = json.loads(source_path(answers_csv).read_text())
    except (OSError, ValueError):
        return None
    ids = ",".join(map(str, sorted(questions["question_idx"].tolist())))
    return {
        "source": source,
        "questions": hashlib.sha256(ids.encode()).hexdigest(),
        "likelihood_edit": likelihood_edit,
        "tqa_dir": None if tqa_dir is None else str(tqa_dir),
    }


def _read_metrics_cache(path: Path, key: dict | None) -> dict:
    """The cached metrics made under `key`; {} when there are none, they were made otherwise, or the file is
    damaged (then with one warning: they are computed again)."""
    if key is None or not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("metrics"), dict):
            raise ValueError("no metrics")
    except ValueError as err:
        warnings.warn(f"{path} is damaged ({err}): its metrics are computed again.", stacklevel=2)
        return {}
    return dict(saved["metrics"]) if saved.get("key") == key else {}


def _write_metrics_cache(path: Path, key: dict | None, metrics: dict) -> None:
    if key is not None:
        write_json(path, {"key": key, "metrics": metrics})


@dataclass
class Measured:
    """A fold's answers and what the subject model measured of them (nothing judged yet): `measure` makes it,
    `judge_measured` scores it."""

    answers: pd.DataFrame  # the answers file's rows
    questions: pd.DataFrame  # the questions asked (question_idx, references)
    answers_csv: Path
    firing: dict  # {"firing_rate": ...} for SLIM (the share of decoded positions where its layer fired), else {}
    likelihood: dict  # MC1/MC2 and CE/KL, when asked for


def measure(
    lm,
    questions: pd.DataFrame,
    edit: EditFactory | None,
    answers_csv: Path,
    batch_size: int = 64,
    max_new_tokens: int = 50,
    mc: bool = False,
    ce_kl: bool = False,
    tqa_dir=None,
    prefix_cache: bool = True,
    stop_at_answer: bool = True,
    answer_rule: str = "published",
    likelihood_edit: str = "every",
) -> Measured:
    """Everything of `evaluate` that needs the subject model: the answers (to `answers_csv`, resumed if it
    exists), SLIM's firing rate, MC1/MC2 and CE/KL (cached beside the answers)."""
    from ..answering.answers import answer_questions, firing_rate_of
    from ..answering.likelihood import ce_and_kl, load_text_corpus, mc_scores

    counts = getattr(edit, "firing_counts", None)  # SLIM: the decoded positions at which its detector fires
    answers = answer_questions(
        lm.model,
        lm.tokenizer,
        questions,
        answers_csv,
        edit=edit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prefix_cache=prefix_cache,
        stop_at_answer=stop_at_answer,
        answer_rule=answer_rule,
    )
    # share of the decoded positions where SLIM's layer fired, over every decode of these answers (resumed ones too)
    firing = {"firing_rate": firing_rate_of(answers_csv, questions["question_idx"])} if callable(counts) else {}
    # MC1/MC2 and CE/KL: kept beside the answers, keyed by what made them (a rerun recomputes none)
    cache_path = answers_csv.with_name(answers_csv.stem + ".metrics.json")
    key = _metrics_key(answers_csv, questions, likelihood_edit, tqa_dir)
    cached = _read_metrics_cache(cache_path, key)
    before = dict(cached)
    likelihood = {}
    if callable(counts) and firing["firing_rate"] is None:  # answers decoded before counts were kept beside them
        firing["firing_rate"] = cached.get("firing_rate")  # the rate their decoding measured, if it was kept
    if mc:
        if "mc" not in cached:
            cached["mc"] = mc_scores(
                lm.model, lm.tokenizer, questions, edit=edit, prefix_cache=prefix_cache, edit_at=likelihood_edit
            )
            _write_metrics_cache(cache_path, key, cached)  # minutes of work: kept before CE/KL starts
            before = dict(cached)
        likelihood.update(cached["mc"])
    if ce_kl:  # the unintervened model gets its CE and a KL of 0
        if "ce_kl" not in cached:
            texts, corpus = load_text_corpus(tqa_dir=tqa_dir)
            result = ce_and_kl(lm.model, lm.tokenizer, texts, edit=edit, edit_at=likelihood_edit)
            cached["ce_kl"] = {"ce": float(result.ce), "kl": float(result.kl), "ce_kl_corpus": corpus}
        likelihood.update(cached["ce_kl"])
    if cached != before:  # a rerun that read everything back writes nothing
        _write_metrics_cache(cache_path, key, cached)
    return Measured(answers, questions, answers_csv, firing, likelihood)


def judge_measured(
    measured: Measured,
    scorers: Scorers,
    method: str,
    params: dict,
    fold: int,
    split: str,
    scored_csv: Path | None = None,
) -> dict:
    """Score measured answers with the run's judges and embedder (to `scored_csv`, default
    `<answers>_scored.csv`): one summary row."""
    from ..judges import judge_identity
    from .metrics import cached_sem_scores, degeneracy_rate, summary_row, true_info

    answers, ans = measured.answers, measured.answers["answer"].tolist()
    truth = scorers.truth_judge.score(answers["question"].tolist(), ans)
    info = scorers.info_judge.score(answers["question"].tolist(), ans)
    refs = measured.questions.set_index("question_idx").loc[answers["question_idx"]]
    sem_cache = measured.answers_csv.with_name(measured.answers_csv.stem + ".sem.json")  # read back on a rerun
    refs = refs["Correct Answers"].tolist(), refs["Incorrect Answers"].tolist()
    _, sem = cached_sem_scores(sem_cache, scorers.embedder, scorers.embedder_name, ans, *refs)
    answers = answers.assign(truth_score=truth, info_score=info)
    write_csv(answers, scored_csv or scored_path(measured.answers_csv))
    metrics = {
        **true_info(truth > 0.5, info > 0.5),
        "sem": sem,
        "degeneracy": degeneracy_rate(ans),
        **measured.firing,
        "n_questions": len(answers),
        **measured.likelihood,
    }
    return summary_row(
        method,
        {
            **params,
            "judge": scorers.judge_names[0],
            "info_judge": scorers.judge_names[1],
            "judge_id": judge_identity(scorers.truth_judge),  # name and weights hash: see slim.judges.base
            "info_judge_id": judge_identity(scorers.info_judge),
            "embedder": scorers.embedder_name,
        },
        fold,
        split,
        **metrics,
    )


def evaluate(lm, questions, edit, method, params, fold, split, answers_csv, scorers, scored_csv=None, **options):
    """Answer `questions` with `edit` active, then score the answers: one summary row (`measure`, then
    `judge_measured`; `options` are measure's). The answers go to `answers_csv` (resumed if it exists), the
    scored answers to `scored_csv` (default: beside it, `<answers>_scored.csv`)."""
    measured = measure(lm, questions, edit, answers_csv, **options)
    return judge_measured(measured, scorers, method, params, fold, split, scored_csv)


def fold_average(rows: list[dict]) -> dict:
    """Mean of the numeric metrics over folds (fold = 'mean'), other fields from the first row. A metric that a
    fold lacks (None, NaN) has no mean (None), rather than the mean of the other folds under the folds' name."""
    df = pd.DataFrame(rows)
    out = dict(rows[0])
    for col in df.columns:
        if col not in ("fold",) and pd.api.types.is_numeric_dtype(df[col]):
            out[col] = float(df[col].mean()) if df[col].notna().all() else None
    out["fold"] = "mean"
    out.pop("scored_answers", None)  # one file per fold: the fold rows name theirs
    return out


def format_row(row: dict) -> str:
    return (
        f"{row['method']:<12} fold {row['fold']!s:<4} {row['split']:<4} n={int(row['n_questions']):<4} "
        f"True*Info {row['true_info']:6.2f}  True {row['true']:6.2f}  Info {row['info']:6.2f}  "
        f"SEM {row['sem']:.3f}  degenerate {row['degeneracy']:.3f}"
    )


def split_questions(df: pd.DataFrame, split_idx: np.ndarray, max_questions: int | None) -> pd.DataFrame:
    """The questions of a split in CSV order, with question_idx: all, or the first `max_questions` in the split's own
    order (the run's question order, which mixes question types; the CSV's first 409 are all Adversarial)."""
    idx = np.sort(np.asarray(split_idx)[:max_questions] if max_questions else np.asarray(split_idx))
    out = df.loc[idx].copy()  # df is indexed by CSV row: a question subset (n_questions) need not be 0..N-1
    out.insert(0, "question_idx", idx)
    return out


def policy_folder(edit, layout: RunLayout, name: str, fold: int) -> Path | None:
    """The folder (absolute) holding a fold's policy: where it was saved or loaded from (`Policy.folder_`), else it
    is saved now under `<out_dir>/policies/<tag>/<run name>_fold<k>`. None for no edit or an edit that is not a
    Policy."""
    if edit is None or not callable(getattr(edit, "save", None)) or not callable(getattr(edit, "digest", None)):
        return None
    folder = getattr(edit, "folder_", None)
    if folder is None:
        folder = edit.save(layout.out_dir / "policies" / layout.tag / f"{name}_fold{fold}")
    return Path(folder).resolve()  # the config is read from other folders (transfer.py)


@dataclass
class MethodResult:
    rows: list[dict]  # one per scored fold
    mean: dict  # their fold mean
    summary_json: Path  # rows + mean; .csv beside it, and .config.json with the run's configuration


# EvalConfig's fields that `measure` takes
MEASURE_OPTIONS = "batch_size max_new_tokens mc ce_kl prefix_cache stop_at_answer answer_rule likelihood_edit".split()


def _check_fold(cfg: EvalConfig, folds: list[dict]) -> None:
    if cfg.fold is not None and cfg.fold >= len(folds):
        raise ParameterError("fold", f"must lie in 0..{len(folds) - 1}, got {cfg.fold}.")


def _measure_folds(lm, questions, folds, method, params, edit_for_fold, cfg, layout, tqa_dir):
    """What the subject model makes of each scored fold, one fold each time the generator is asked:
    (fold, Measured, whose answers, scored CSV, policy folder, policy digest)."""
    name = method_name(method, params)
    for fold, split in enumerate(folds):
        if cfg.fold is not None and fold != cfg.fold:
            continue
        qs = split_questions(questions, split[cfg.use_mode], cfg.max_questions)
        edit, answered_by = edit_for_fold(fold), name
        folder = policy_folder(edit, layout, name, fold)  # where the fold's policy lives (transfer.py reads it)
        digest = edit.digest() if folder is not None else None
        if getattr(edit, "moves_nothing", False):
            # e.g. SLIM at kappa 0: its answers are the unintervened model's, token for token (tested), so
            # the unintervened answers are read or written instead of answering the same questions again.
            edit, answered_by = None, "baseline"
        answers_csv = layout.answers(answered_by, fold, cfg.use_mode, cfg.max_questions)
        options = {k: getattr(cfg, k) for k in MEASURE_OPTIONS}
        measured = measure(lm, qs, edit, answers_csv, tqa_dir=tqa_dir, **options)
        scored_csv = scored_path(layout.answers(name, fold, cfg.use_mode, cfg.max_questions))
        yield fold, measured, answered_by, scored_csv, folder, digest


def _judge_folds(work, method, params, scorers, cfg, layout, config, on_row) -> MethodResult:
    """Score each measured fold of `work` (as `_measure_folds` yields them) and write the method's summary."""
    from .metrics import write_summary

    rows, policy_dirs, policy_digests = [], {}, {}
    for fold, measured, answered_by, scored_csv, folder, digest in work:
        if folder is not None:
            policy_dirs[str(fold)], policy_digests[str(fold)] = str(folder), digest
        row = judge_measured(measured, scorers, method, params, fold, cfg.use_mode, scored_csv)
        row["answers_of"] = answered_by
        row["scored_answers"] = str(scored_csv)  # per-question verdicts: paired intervals (slim.evaluation.reports)
        row["model"] = layout.model
        row["run"] = layout.tag
        rows.append(row)
        if on_row:
            on_row(row)
    mean = fold_average(rows)
    stem = layout.summary_stem(method_name(method, params), cfg.use_mode, cfg.max_questions, cfg.fold)
    summary_json = Path(f"{stem}.json")
    write_summary(rows + [mean], Path(f"{stem}.csv"), summary_json)
    policies = {"policy_dirs": policy_dirs, "policy_digests": policy_digests} if policy_dirs else {}
    write_json(Path(f"{stem}.config.json"), {"method": method, "params": params, **(config or {}), **policies})
    if on_row:
        on_row(mean)
    return MethodResult(rows, mean, summary_json)


def evaluate_method(
    lm,
    questions: pd.DataFrame,
    folds: list[dict],
    method: str,
    params: dict,
    edit_for_fold: Callable[[int], EditFactory | None],
    scorers: Scorers,
    cfg: EvalConfig,
    layout: RunLayout,
    config: dict | None = None,
    tqa_dir=None,
    on_row: Callable[[dict], None] | None = None,
) -> MethodResult:
    """Answer and score every fold's split (or only `cfg.fold`) with `edit_for_fold(fold)` attached.

    Writes the answers, the summary (per-fold rows and their mean, CSV and
    JSON) and, beside it, `config` (the whole run's settings) as
    `<summary>.config.json`, with `policy_dirs` ({fold: folder}) and
    `policy_digests` ({fold: Policy.digest()}) of the folds whose edit is a
    saveable policy (`policy_folder`; the unintervened model records none).
    `on_row(row)` is called as each row is ready.
    """
    _check_fold(cfg, folds)
    work = _measure_folds(lm, questions, folds, method, params, edit_for_fold, cfg, layout, tqa_dir)
    return _judge_folds(work, method, params, scorers, cfg, layout, config, on_row)  # each fold judged once measured


def release_subject(lm) -> None:
    """Drop the subject model (`lm.model`) and hand its GPU memory back, for the judges to load."""
    import gc

    import torch

    lm.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("memory is short: the subject model was released before the judges load (every answer is made).")


def evaluate_methods(
    lm,
    questions: pd.DataFrame,
    folds: list[dict],
    runs: list[tuple],
    cfg: EvalConfig,
    layout: RunLayout,
    config: dict | None = None,
    tqa_dir=None,
    on_row: Callable[[dict], None] | None = None,
) -> list[MethodResult]:
    """`evaluate_method` for each (method, params, {fold: policy}) of `runs` (a fourth item: that run's own
    `config`), all scored by the same judges, loaded on the run's device (`lm.device`).

    When the judges are local ones on a GPU whose free memory cannot hold them
    beside the subject model (slim.judges.local.release_subject_first), every
    run's answers and likelihood metrics are made first, the subject model is
    released (`lm.model` is None afterwards), and then the judges load and
    score; the files written are the same either way.
    """
    from ..judges.local import release_subject_first

    _check_fold(cfg, folds)
    device = str(getattr(lm, "device", "cpu"))
    scorers = load_scorers(cfg.judge_name, cfg.info_name, cfg.embedder, tqa_dir, device=device)
    runs = [(method, params, policies, rest[0] if rest else config) for method, params, policies, *rest in runs]
    # generators: each fold is measured when its judging asks for it, as in evaluate_method ...
    works = [_measure_folds(lm, questions, folds, m, p, pol.get, cfg, layout, tqa_dir) for m, p, pol, _ in runs]
    if release_subject_first([scorers.truth_judge, scorers.info_judge]):
        works = [list(work) for work in works]  # ... unless memory is short: every fold of every run first
        release_subject(lm)
    return [
        _judge_folds(work, method, params, scorers, cfg, layout, own, on_row)
        for work, (method, params, _, own) in zip(works, runs)
    ]

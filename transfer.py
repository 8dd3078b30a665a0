"""Transfer (the paper's section 5.2): TruthfulQA-fitted policies answering NQ-open questions.

    python transfer.py validation/summary/llama_7B_slim_kappa40_gamma0.1_psiidentity_bl1_test.json \
        validation/summary/llama_7B_iti_alpha15_heads48_dircom_test.json --device 0 --out paper/transfer_llama_7B.md
    python transfer.py validation/summary/smollm2_135M_*_test.json --nq_file nq_open_validation.jsonl \
        --max_questions 300 --out paper/transfer_smollm2_135M.md

Reads each TruthfulQA summary's config (its method and the policy folder of
each fold, `policy_dirs`), loads those policies and, with the unintervened
model, answers NQ-open questions with the TruthfulQA prompt and decoding.
Scores: gold match (a normalised gold answer contained in the answer), and
the run's truth and info judges (True %, Info %, True*Info), with bootstrap
intervals and paired changes from the unintervened answers (slim/transfer.py).
Writes the Markdown report to --out and its numbers to a JSON beside it.
NQ-open comes from the first of: --nq_file, the file the environment
variable SLIM_NQ_FILE names, the cache ($SLIM_CACHE/nq_open/NQ-open.dev.jsonl),
then the Hugging Face hub (`pip install datasets`, online); the report and
the JSON say which, with the file's sha256. Where none can be had, a note
saying so goes to --out and the script exits 0.

The answer sets (`--list_answer_sets`: the unintervened model's, then each
fold's policy's) are independent: `--answer_set NAME` answers one of them
into the cache and stops, so several processes (reproduce.sh's units, one
per GPU or core) can answer them at once; the report then reads them back.
"""

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import slim_utils as su
from slim.config import EvalConfig
from slim.evaluation.evaluate import load_scorers
from slim.io import artefact_lock, write_json, write_text
from slim.layout import model_tag
from slim.models.loading import resolve_device
from slim.paper.nq_open import TransferUnavailable, data_key, load_nq_open
from slim.paper.transfer import (
    answer_set,
    answer_set_names,
    load_transfer_runs,
    read_config,
    run_transfer,
    transfer_markdown,
    unavailable_note,
)

MODEL_FLAGS = ("--model_dir", "--head_layout", "--device", "--dtype", "--allow_offload", "--tqa_dir")
RUN_FLAGS = ("--judge_name", "--info_name", "--embedder", "--max_new_tokens", "--answer_batch_size", "--answer_rule")
# a run setting's flag -> its field in the TruthfulQA run's EvalConfig (config.json "eval")
EVAL_FIELDS = {"answer_batch_size": "batch_size"}


def flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", help="TruthfulQA summary JSONs (test runs), their config beside them")
    parser.add_argument(
        "--nq_file",
        default=None,
        help="NQ-open as JSONL, JSON, CSV or parquet (question, answer); default: $SLIM_NQ_FILE, then "
        "$SLIM_CACHE/nq_open/NQ-open.dev.jsonl, then the hub",
    )
    parser.add_argument("--split", default="validation", help="nq_open split, when loaded from the hub (no file)")
    parser.add_argument(
        "--max_questions", type=int, default=None, help="the first N of a shuffle seeded by --seed (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of that shuffle")
    parser.add_argument("--out", default=None, help="the Markdown report (its numbers: a JSON beside it); required")
    parser.add_argument(
        "--answer_set",
        default=None,
        help="only answer this answer set (cached; no scores, no report), so that several processes answer at "
        "once before the report reads them back",
    )
    parser.add_argument("--list_answer_sets", action="store_true", help="print the answer sets' names, one a line")
    parser.add_argument("--model_name", default=None, help="model key or hub id (default: the TruthfulQA run's)")
    parser.add_argument(
        "--out_dir", default=None, help="answer caches go to <out_dir>/transfer/ (default: the first summary's out_dir)"
    )
    su.add_flags(parser, [f for f in su.COMMON_FLAGS if f[0] in MODEL_FLAGS])
    run_flags = [(f, dict(kw, default=None)) for f, kw in su.EVAL_FLAGS if f in RUN_FLAGS]
    for _, kw in run_flags:
        kw["help"] = kw.get("help", "") + " (default: the TruthfulQA run's)"
    return su.accept_shared(su.add_flags(parser, run_flags))  # the run's other flags are accepted, unused


def json_path(out: Path) -> Path:
    return out.with_suffix(".json") if out.suffix.lower() == ".md" else out.with_name(out.name + ".json")


def ran_before(path: Path) -> bool:
    """Whether the JSON at `path` is a transfer report that ran (not a note, not damaged)."""
    try:
        return json.loads(path.read_text()).get("status") == "ran"
    except (OSError, ValueError, AttributeError):
        return False


def main(argv=None):
    args = flags().parse_args(argv)
    if args.list_answer_sets:
        print("\n".join(answer_set_names(load_transfer_runs(args.summaries))))
    elif args.answer_set:
        answer_only(args)
    elif not args.out:
        raise ValueError("--out is required: the report's path (or --answer_set NAME, or --list_answer_sets).")
    else:  # two runs asking for the same report: one after the other; other reports (and their answers) at once
        with artefact_lock(args.out):
            report(args, argv)


def answer_only(args) -> None:
    """--answer_set: that set's answers, cached where the report will read them; nothing scored."""
    runs = load_transfer_runs(args.summaries)
    if args.answer_set not in answer_set_names(runs):  # before loading anything
        raise ValueError(f"--answer_set {args.answer_set}: pick one of {', '.join(answer_set_names(runs))}.")
    cfg, _ = run_settings(args, runs)
    try:
        questions = load_nq_open(args.nq_file, args.split, args.max_questions, args.seed)
    except TransferUnavailable as err:
        print(f"transfer could not run ({' '.join(str(err).split())}); answer set {args.answer_set} not answered")
        return
    answers_dir = answers_folder(args, questions.attrs["source"])
    csv = answers_dir / f"{args.answer_set}.csv"
    with artefact_lock(csv):  # two processes on one answer set: the second reads the first's back
        lm = load_model(args)
        got = answer_set(lm, runs, questions, answers_dir, cfg, args.answer_set)
    print(f"answer set {args.answer_set}: {len(got):,} answers in {csv}")


def run_settings(args, runs) -> tuple[EvalConfig, str | None]:
    """The answering and judging settings (flags, else the TruthfulQA run's, else the defaults) and the
    TruthfulQA folder; fills in args' model from the run where no flag names one."""
    config = runs[0].config if runs else read_config(args.summaries[0])  # only the unintervened model's
    ran = config.get("eval") or {}
    settings = {f.lstrip("-"): getattr(args, f.lstrip("-")) for f in RUN_FLAGS}
    settings["info_name"] = su.info_judge_name(settings["judge_name"], settings["info_name"])  # allenai: the pair
    for flag, value in settings.items():
        if value is None:
            settings[flag] = ran.get(EVAL_FIELDS.get(flag, flag), getattr(EvalConfig, EVAL_FIELDS.get(flag, flag)))
    cfg = EvalConfig(
        judge_name=settings["judge_name"],
        info_name=settings["info_name"],
        embedder=settings["embedder"],
        max_new_tokens=settings["max_new_tokens"],
        batch_size=settings["answer_batch_size"],
        prefix_cache=ran.get("prefix_cache", True),
        stop_at_answer=ran.get("stop_at_answer", True),
        answer_rule=settings["answer_rule"],
    )
    model = config.get("model") or {}
    if args.model_name is None and args.model_dir is None:
        args.model_name, args.model_dir = model.get("name") or su.DEFAULT_MODEL, model.get("model_dir")
        args.head_layout = args.head_layout or model.get("head_layout")
    args.model_name = args.model_name or model.get("name") or su.DEFAULT_MODEL
    return cfg, args.tqa_dir or (config.get("data") or {}).get("tqa_dir")


def answers_folder(args, source: dict) -> Path:
    """<out_dir>/transfer/<model tag>/<data key>: where the answer sets of these questions are cached."""
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.summaries[0]).resolve().parent.parent
    return out_dir / "transfer" / model_tag(args.model_name, args.model_dir) / data_key(source)


def load_model(args):
    args.device = resolve_device(args.device)
    su.resolve_model_dtype(args)
    return su.model_loader(args)()


def report(args, argv=None) -> None:
    """The transfer report of `args` (see the module docstring), written to args.out and a JSON beside it."""
    command = "python transfer.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = Path(args.out)
    runs = load_transfer_runs(args.summaries)
    cfg, tqa_dir = run_settings(args, runs)
    try:
        questions = load_nq_open(args.nq_file, args.split, args.max_questions, args.seed)
    except TransferUnavailable as err:
        reason = " ".join(str(err).split())
        if ran_before(json_path(out)):  # a note would replace results this run cannot redo
            print(f"transfer could not run ({reason}); the earlier report {out} is kept")
            return
        write_text(out, unavailable_note(reason, command, date))
        write_json(json_path(out), {"status": "not run", "reason": reason, "command": command, "date": date})
        print(f"transfer could not run ({reason}); note written to {out}")
        return
    source = questions.attrs["source"]
    tag = model_tag(args.model_name, args.model_dir)
    answers_dir = answers_folder(args, source)
    lm = load_model(args)
    scorers = load_scorers(cfg.judge_name, cfg.info_name, cfg.embedder, tqa_dir, device=str(lm.device))
    result = run_transfer(lm, runs, questions, scorers, answers_dir, cfg, on_row=print_row)

    from slim.judges import judge_identity

    n_params = sum(p.numel() for p in lm.model.parameters())
    judges = {"truth": judge_identity(scorers.truth_judge), "info": judge_identity(scorers.info_judge)}
    subset = source.get("subset")
    picked = (
        f", the first {subset['n']} of a permutation seeded by {subset['seed']} (numpy default_rng), in file order"
        if subset
        else ", all of them"
    )
    header = [
        f"## Transfer to NQ-open: TruthfulQA-fitted policies ({tag})",
        "",
        f"Command: `{command}`",
        f"Date: {date}",
        f"Model: `{tag}` ({parameters(n_params)} parameters); answers: the TruthfulQA prompt, greedy, "
        f"--max_new_tokens {cfg.max_new_tokens}, the {cfg.answer_rule} answer rule.",
        f"Judges: truth `{judges['truth']}`, info `{judges['info']}`.",
        f"Data: NQ-open from {data_source(source)}: {len(questions):,} of {source['records']:,} questions{picked}.",
        "Policies: each fold's policy as fitted on TruthfulQA (" + ", ".join(f"`{r.summary}`" for r in runs) + "); "
        "every fold's policy answers every question.",
    ]
    small = n_params < 6e9
    if small:
        header.append(
            f"**Small-model results**: a model of {parameters(n_params)} parameters, not the paper's 7B models; "
            "read them as a check of the pipeline, not as the paper's numbers."
        )
    header += [
        "",
        "Gold match: an answer counts when a gold answer, normalised as in SQuAD (lower case, no punctuation, no "
        "a / an / the, single spaces), occurs in it as whole words: containment, the lenient NQ-open convention for "
        "free generation. The judges see the question and the answer only, never the gold answers (the offline "
        "judge's reference features are empty outside TruthfulQA), so gold match is the measure of correctness "
        "here; True % and Info % are the judges' reading.",
    ]
    text = transfer_markdown(result, header)
    write_text(out, text)
    write_json(
        json_path(out),
        {
            "status": "ran",
            "command": command,
            "date": date,
            "model": {"tag": tag, "name": args.model_name, "model_dir": args.model_dir, "parameters": n_params},
            "judges": judges,
            "small_model": small,
            "data": source,
            "questions": len(questions),
            "eval": {
                "max_new_tokens": cfg.max_new_tokens,
                "answer_rule": cfg.answer_rule,
                "prefix_cache": cfg.prefix_cache,
                "stop_at_answer": cfg.stop_at_answer,
            },
            "summaries": [str(r.summary) for r in runs],
            "policy_dirs": {r.name: {str(k): str(p.folder_) for k, p in r.policies.items()} for r in runs},
            **result,
        },
    )
    print(f"transfer report: {out} (numbers: {json_path(out)})")


def data_source(source: dict) -> str:
    """Where the questions came from, for the report: the file, how it was found and its sha256, or the hub."""
    if "file" not in source:
        return f"Hugging Face `{source['dataset']}`, split `{source['split']}` (online, through `datasets`)"
    found = {"cache": "the cache"}.get(source.get("found_by"), f"`{source.get('found_by')}`")
    which = "the published NQ-open dev split" if source.get("dev_split") else "not the published NQ-open dev split"
    return f"`{source['file']}` (found by {found}; sha256 `{source['sha256']}`, {which})"


def parameters(n: int) -> str:
    """134.5 M, 6.74 B, or the count itself below a million."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def print_row(row: dict) -> None:
    cells = "  ".join(f"{k} {row[k][0]:6.2f}" for k in ("gold_match", "true", "info", "true_info"))
    print(f"{row['name']:<40} fold {row['fold']!s:<4} n={row['questions']:<5} {cells}", flush=True)


if __name__ == "__main__":
    su.run_main(main, flags={"nq_file": "--nq_file", "max_questions": "--max_questions"})

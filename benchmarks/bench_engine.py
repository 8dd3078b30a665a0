"""The quick SLIM sweep with ENGINE=ray (N workers) against ENGINE=sequential, side by side in one run.

    python benchmarks/bench_engine.py --stage1 validation/quick            # SmolLM2, quick mode, 2 workers

The sweep (`bash sweep.sh`, the quick mode's settings: the first 300
questions, kappa 0 10 20 40 80, both folds) runs twice from the same stage 1
(probes, splits, activations: copied from --stage1, an OUT_DIR where
`run_pipeline.sh` or `reproduce.sh` ran stage 1 for the model), each time in a
fresh output folder so that neither reads the other's answers: once
sequentially (one process for the grid, the model loaded once) and once with
ENGINE=ray (a task per kappa, --workers at once, each loading the model). It
prints each wall time, their ratio, and whether the two runs wrote the same
answers, summaries and choice. On 2 CPU cores expect little gain: the tasks
share the cores the sequential run had to itself (OMP_NUM_THREADS is split).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE1 = ("features", "probes", "splits")  # what the sweep reads from stage 1 (and the chosen layer's json)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2_135M")
    p.add_argument("--stage1", required=True, help="an OUT_DIR holding stage 1 for the model (quick mode)")
    p.add_argument("--kappas", default="0 10 20 40 80")
    p.add_argument("--n_questions", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for both runs (default: the sequential run takes every core, Ray gives each "
        "task its share, so the two may differ in the last bits of floating-point sums)",
    )
    p.add_argument("--keep", action="store_true", help="keep the two output folders")
    return p.parse_args(argv)


def fresh_out_dir(stage1: Path, parent: Path, name: str) -> Path:
    """A new OUT_DIR holding stage 1's artefacts (copied), nothing downstream of them."""
    out = parent / name
    out.mkdir()
    for sub in STAGE1:
        if (stage1 / sub).exists():
            shutil.copytree(stage1 / sub, out / sub)
    for f in stage1.glob("*_chosen_layer_*.json"):
        shutil.copy2(f, out / f.name)
    return out


def sweep(out: Path, args, engine: str) -> float:
    env = {**os.environ, "MODEL": args.model, "KAPPAS": args.kappas, "OUT_DIR": str(out), "ENGINE": engine}
    if engine == "ray":
        env["ENGINE_WORKERS"] = str(args.workers)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "sweep.sh", "--n_questions", str(args.n_questions)], cwd=REPO, env=env,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: the {engine} sweep failed: {proc.stderr.strip().splitlines()[-1:]}")
    return seconds


def written(out: Path) -> dict:
    """The sweep's products (answers, summaries, policies, the choice), lock files and checksum sidecars aside:
    bytes with the output folder's own path (which summaries record) written as OUT_DIR; safetensors as their
    tensors and metadata (the header's key order differs from process to process)."""
    from safetensors import safe_open

    paths = [p for sub in ("answers", "summary", "policies") for p in sorted((out / sub).rglob("*"))]
    paths += sorted(out.glob("*_best_slim.json"))
    own, files = str(out).encode(), {}
    for p in paths:
        if not p.is_file() or p.name.endswith((".lock", ".sha256.json")):
            continue
        if p.suffix == ".safetensors":
            with safe_open(str(p), "np") as f:
                meta = {k: v.replace(str(out), "OUT_DIR") for k, v in (f.metadata() or {}).items()}
                files[str(p.relative_to(out))] = ([(k, f.get_tensor(k).tobytes()) for k in sorted(f.keys())], meta)
        else:
            files[str(p.relative_to(out))] = p.read_bytes().replace(own, b"OUT_DIR")
    return files


def main(argv=None) -> None:
    args = parse_args(argv)
    stage1 = Path(args.stage1).resolve()
    if not any(stage1.glob("*_chosen_layer_*.json")):
        sys.exit(f"error: --stage1 {stage1} holds no stage 1 (no *_chosen_layer_*.json): run run_pipeline.sh first.")
    parent = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    try:
        seq_out, ray_out = fresh_out_dir(stage1, parent, "sequential"), fresh_out_dir(stage1, parent, "ray")
        print(f"{args.model}: the SLIM sweep (kappa {args.kappas}, first {args.n_questions} questions, both folds), "
              f"from {stage1}")  # fmt: skip
        seq_s = sweep(seq_out, args, "sequential")
        print(f"sequential (one process for the grid): {seq_s:.0f} s")
        ray_s = sweep(ray_out, args, "ray")
        print(f"ray ({args.workers} workers, a task per kappa): {ray_s:.0f} s")
        print(f"sequential / ray: {seq_s / ray_s:.2f}x")
        a, b = written(seq_out), written(ray_out)
        differ = sorted(set(a) ^ set(b)) + [k for k in a if k in b and a[k] != b[k]]
        threads = f"OMP_NUM_THREADS {args.threads} in both" if args.threads else "threads: all cores vs a share each"
        print(f"same answers, summaries, policies and choice: {'yes' if not differ else 'NO'} ({len(a)} files; "
              f"{threads})" + "".join(f"\n  differs: {k}" for k in differ[:8]))  # fmt: skip
    finally:
        if args.keep:
            print(f"kept {parent}")
        else:
            shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()

"""A sweep: every value of a knob evaluated in one process, and the best setting picked from its summaries.

`evaluate_grid` answers and scores several runs (one per grid value) with the
model and the judges loaded once; `at_knob` gives a fitted policy at another
value of its knob without fitting it again.

    python -m slim.evaluation.sweep --criterion true_info --max_degeneracy 0.2 --param kappa --method slim \
        --out_dir validation validation/summary/smollm2_135M_slim_*_val.json

Each summary JSON holds per-fold rows and a fold-mean row; the mean rows are
compared; summaries scored by different judges are refused (one line naming
both). The default criterion is True*Info from the judges, ties broken by
SEM. A setting whose degeneracy rate (answers that are empty or mostly one
repeated token or phrase) exceeds --max_degeneracy is never chosen: a broken
model can score well on SEM.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Callable

from ..io import artefact_lock
from .metrics import check_same_judges, read_summary

CRITERIA = ("true_info", "true", "info", "sem")


def at_knob(policy, **knobs):
    """The fitted `policy` at other knob values (e.g. kappa=10): the same tensors, fingerprint and meta, a new
    object not saved anywhere. Policy.load builds policies the same way, from their tensors and params()."""
    tensors = {name: getattr(policy, name) for name in policy.tensor_names}
    unknown = sorted(set(knobs) - set(policy.params()))
    if unknown:
        raise ValueError(f"a {policy.kind} policy has no knob {unknown[0]!r} (its knobs: {sorted(policy.params())}).")
    params = {**policy.params(), **knobs}
    return type(policy)(**tensors, **params, fingerprint=policy.fingerprint, meta=copy.deepcopy(policy.meta))


def save_run_policies(runs, cfg, layout) -> None:
    """Save each run's fold policies that are not on disk yet where evaluation would (slim.evaluation.evaluate.
    policy_folder: `<out_dir>/policies/<tag>/<run name>_fold<k>`), each under its folder's lock, so two runs of
    the same point never write one folder at once. Only the folds that will be scored (cfg.fold)."""
    from ..layout import method_name

    for method, params, policies, _ in runs:
        for fold, policy in policies.items():
            if cfg.fold is not None and fold != cfg.fold:
                continue
            if (
                policy is None
                or getattr(policy, "folder_", None) is not None
                or not callable(getattr(policy, "save", None))
            ):
                continue
            folder = layout.out_dir / "policies" / layout.tag / f"{method_name(method, params)}_fold{fold}"
            with artefact_lock(folder):
                policy.save(folder)


def evaluate_grid(
    lm,
    questions,
    folds: list[dict],
    runs: list[tuple[str, dict, dict, dict]],
    cfg,
    layout,
    tqa_dir=None,
    on_row: Callable[[dict], None] | None = None,
) -> list:
    """slim.evaluation.evaluate.evaluate_methods on runs that each carry their own run configuration:
    (method, params, {fold: policy}, config). The judges and the embedder are loaded once for all; each run
    writes its answers, policies, summary and config exactly as it would evaluated alone, its policies first,
    each under its folder's lock (save_run_policies). -> [MethodResult], in order."""
    from .evaluate import evaluate_methods

    save_run_policies(runs, cfg, layout)
    return evaluate_methods(lm, questions, folds, runs, cfg, layout, None, tqa_dir, on_row)


def select_best(rows: list[dict], criterion: str = "true_info", max_degeneracy: float = 0.2) -> dict:
    """The row with the highest criterion (then SEM) among those not degenerate."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}.")
    usable = [r for r in rows if r["degeneracy"] <= max_degeneracy]
    if not usable:
        raise ValueError(
            f"every setting has a degeneracy rate above {max_degeneracy}: widen the grid towards "
            "weaker settings or raise max_degeneracy."
        )
    return max(usable, key=lambda r: (r[criterion], r["sem"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Pick the best setting of a sweep.")
    parser.add_argument("summaries", nargs="+")
    parser.add_argument("--criterion", default="true_info", choices=CRITERIA)
    parser.add_argument("--max_degeneracy", type=float, default=0.2)
    parser.add_argument("--param", default="kappa", help="the swept parameter to report")
    parser.add_argument("--method", default="slim", help="names the output: <out_dir>/<run>_best_<method>.json")
    parser.add_argument("--out_dir", default=None, help="write the choice under this folder as JSON")
    args = parser.parse_args(argv)
    rows = [dict(read_summary(s)[1], summary=str(s)) for s in args.summaries]
    unrecorded = check_same_judges(rows, args.summaries)  # a knob is chosen by one judge's verdicts only
    for r in rows:
        if args.param not in r:
            # ITI's alpha = 0 runs as the unintervened model, whose summary names no knob
            if r.get("method") != "baseline":
                raise ValueError(f"{r['summary']} has no {args.param!r}: is it a {args.method} summary?")
            r[args.param] = 0.0
    print(f"{args.param:>10} {'True*Info':>10} {'True':>7} {'Info':>7} {'SEM':>6} {'degen':>6}")
    for r in sorted(rows, key=lambda r: float(r[args.param])):
        print(
            f"{r[args.param]:>10g} {r['true_info']:10.2f} {r['true']:7.2f} {r['info']:7.2f} "
            f"{r['sem']:6.3f} {r['degeneracy']:6.3f}"
        )
    if unrecorded:
        print(
            f"note: judge identity not recorded in {len(unrecorded)} of {len(rows)} summaries (written before "
            "judges were identified): their judges are compared by name only."
        )
    best = select_best(rows, args.criterion, args.max_degeneracy)
    print(
        f"best {args.param}: {best[args.param]:g} (criterion {args.criterion}, ties by SEM, "
        f"degeneracy <= {args.max_degeneracy})"
    )
    if args.out_dir:
        from ..io import write_json
        from ..layout import RunLayout

        # the run tag (model and question subset) of the summaries; older summaries only name the model
        out = RunLayout(Path(args.out_dir), best.get("run", best["model"])).best(args.method)
        print(f"written to {out}")
        record = {
            "param": args.param,
            "value": best[args.param],
            "criterion": args.criterion,
            "max_degeneracy": args.max_degeneracy,
            "row": best,
            "candidates": rows,
        }
        with artefact_lock(out):  # two sweeps of one method on one folder: one writer at a time
            write_json(out, record)
    return best


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as err:  # bad settings; a damaged summary (slim.io.DamagedArtefact)
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None

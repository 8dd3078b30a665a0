"""Baselines: ITI (Li et al., 2023) and, with --alpha 0, the unintervened model.

    python validate_2fold.py llama_7B --num_heads 48 --alpha 15 --device 0 --num_fold 2 --use_center_of_mass
    python validate_2fold.py smollm2_135M --alpha 0 --num_fold 2 --max_questions 40
    python validate_2fold.py smollm2_135M --alpha 0 2 5 15 --use_center_of_mass --use_mode val --max_questions 40

Per fold: a logistic-regression probe per head on the fold's train rows ranks
the heads by validation accuracy; the top --num_heads get a direction (the
normalised class-mean difference with --use_center_of_mass, a random one with
--use_random_dir, else the probe weight) and are shifted by alpha * sigma *
direction at the last position, sigma being the std of the tuning
activations' projections on it (--tuning_dataset; by default, as published,
the tqa_gen_end_q texts of all questions). The fold's test (or validation)
questions are answered and scored; a summary per fold and the fold average
are written. Several --alpha values are scored in one process (the model, the
heads and the judges loaded or fitted once), each writing the files a run with
that value alone would write.
"""

import argparse

import slim_utils as su
from slim.config import TUNING_DATASETS, ITIConfig, run_config
from slim.data.activations import load_probe_data
from slim.data.folds import questions_and_folds
from slim.evaluation.sweep import at_knob, evaluate_grid
from slim.io import artefact_lock
from slim.policies.base import model_fingerprint
from slim.policies.fit import iti_for_fold


def main():
    parser = su.add_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]), su.COMMON_FLAGS)
    su.add_flags(parser, su.EVAL_FLAGS)
    parser.add_argument("--num_heads", type=int, default=48, help="K: heads to shift (published 48 of 1,024 on 7B)")
    parser.add_argument(
        "--alpha",
        nargs="+",
        default=["15"],
        help="ITI strength; 0 = the unintervened model; 'best': the value sweep.sh chose (METHOD=iti); several "
        "values: each scored in turn",
    )
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--use_center_of_mass", action="store_true", help="class-mean difference directions")
    direction.add_argument("--use_random_dir", action="store_true", help="random directions (ablation)")
    parser.add_argument(
        "--tuning_dataset",
        default="tqa_gen_end_q_all",
        choices=TUNING_DATASETS,
        help="activations whose projections give sigma: ITI's tqa_gen_end_q texts of all questions (published; "
        "one more extraction pass, cached), of the fold's train+val questions only, or the probe texts' "
        "train+val rows (same)",
    )
    su.add_flags(parser, su.ITI_FLAGS)
    args = su.accept_shared(parser).parse_args()
    data_cfg, eval_cfg = su.data_config(args), su.eval_config(args)
    layout = su.run_layout(args)
    kind = "com" if args.use_center_of_mass else "random" if args.use_random_dir else "probe"
    cfgs = [
        ITIConfig(args.num_heads, alpha, kind, args.tuning_dataset)
        for alpha in su.knobs(args.alpha, layout, "iti", "alpha")
    ]

    df, folds = questions_and_folds(data_cfg, layout.splits_dir)
    load = su.model_loader(args)
    lm = load()
    config = run_config(model=su.model_settings(args), data=data_cfg, eval=eval_cfg)
    fitted, first = {}, next((c for c in cfgs if c.alpha != 0), None)  # the heads: fitted once, for every alpha
    if first is not None:
        data = load_probe_data(df, data_cfg.dataset_name, layout, load, args.batch_size, verify=args.verify)
        tuning = None
        if first.tuning_dataset != "same":
            tuning = load_probe_data(df, "tqa_gen_end_q", layout, load, args.batch_size, verify=args.verify)
        fingerprint, device = model_fingerprint(lm.model), su.compute_device(args, load)  # the probes: on the GPU
        for fold, split in enumerate(folds):
            folder = layout.iti_policy(fold, kind, first.num_heads, first.tuning_dataset)
            with artefact_lock(folder):  # fitted by one run; another run waiting here reads them back
                fitted[fold] = iti_for_fold(
                    data, split, first, folder, fingerprint, tuning, device=device, solver=args.iti_solver
                )
    runs = []
    for c in cfgs:
        if c.alpha == 0:  # the unintervened model
            runs.append(("baseline", {}, {}, config))
            continue
        policies = {fold: p if c is first else at_knob(p, alpha=c.alpha) for fold, p in fitted.items()}
        params = {"alpha": c.alpha, "heads": c.num_heads, "dir": kind}
        runs.append(
            ("iti", params, policies, {**config, "iti": run_config(iti=c)["iti"], "iti_solver": args.iti_solver})
        )
    su.report_summaries(args, evaluate_grid(lm, df, folds, runs, eval_cfg, layout, data_cfg.tqa_dir, su.print_row))


if __name__ == "__main__":
    su.run_main(main)

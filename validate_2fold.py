"""Baselines: ITI (Li et al., 2023) and, with --alpha 0, the unintervened model.

    python validate_2fold.py llama_7B --num_heads 48 --alpha 15 --device 0 --num_fold 2 --use_center_of_mass
    python validate_2fold.py smollm2_135M --alpha 0 --num_fold 2 --max_questions 40

Per fold: a logistic-regression probe per head on the fold's train rows ranks
the heads by validation accuracy; the top --num_heads get a direction (the
normalised class-mean difference with --use_center_of_mass, a random one with
--use_random_dir, else the probe weight) and are shifted by alpha * sigma *
direction at the last position, sigma being the std of the tuning
activations' projections on it. The fold's test (or validation) questions are
answered and scored; a summary per fold and the fold average are written.
"""

import argparse
from pathlib import Path

import numpy as np

import slim_utils as su
from slim.interventions import ITIPolicy, Policy, fit_iti, model_fingerprint


def main():
    parser = su.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    su.add_eval_args(parser)
    parser.add_argument("--num_heads", type=int, default=48, help="K: heads to shift (published 48 of 1,024 on 7B)")
    parser.add_argument("--alpha", default="15", help="ITI strength; 0 = the unintervened model; 'best': "
                                                     "the value sweep.sh chose (METHOD=iti)")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--use_center_of_mass", action="store_true", help="class-mean difference directions")
    direction.add_argument("--use_random_dir", action="store_true", help="random directions (ablation)")
    parser.add_argument("--tuning_dataset", default="same", choices=("same", "tqa_gen_end_q"),
                        help="activations whose projections give sigma: the probe texts' train+val rows "
                             "(same), or ITI's tqa_gen_end_q set (another extraction pass)")
    args = parser.parse_args()
    su.check_common_args(args)
    args.alpha = su.knob(args.alpha, args, "iti", "alpha")
    if not np.isfinite(args.alpha):
        raise ValueError(f"--alpha must be finite, got {args.alpha}.")

    df, folds = su.questions_and_splits(args)
    lm = su.load_model_from_args(args)
    tag = su.model_tag(args)
    if args.alpha == 0:
        su.run_method(args, lm, df, folds, "baseline", {}, lambda fold: None)
        return

    data = su.probe_data(args, lm, df)
    L, H = data.activations.shape[1:3]
    if not 1 <= args.num_heads <= L * H:
        raise ValueError(f"--num_heads must lie in 1..{L * H} for this model, got {args.num_heads}.")
    tuning = su.probe_data(args, lm, df, "tqa_gen_end_q") if args.tuning_dataset == "tqa_gen_end_q" else None
    kind = "com" if args.use_center_of_mass else "random" if args.use_random_dir else "probe"
    fingerprint = model_fingerprint(lm.model)
    policies = {}
    for fold, split in enumerate(folds):
        # the fitted heads, directions and sigmas do not depend on alpha: fit once, rescale per run
        folder = (Path(args.out_dir) / "policies" / tag /
                  f"iti_fold{fold}_{kind}_heads{args.num_heads}_{args.tuning_dataset}")
        if (folder / "policy.json").exists():
            fitted = Policy.load(folder)
        else:
            train = su.rows_of(data.texts, split["train"])
            val = su.rows_of(data.texts, split["val"])
            tuning_acts = None
            if tuning is not None:
                fit_rows = su.rows_of(tuning.texts, np.concatenate([split["train"], split["val"]]))
                tuning_acts = tuning.activations[np.sort(fit_rows)]
            fitted = fit_iti(data.activations, data.texts["truthful"].to_numpy(), train, val, args.num_heads,
                             1.0, direction=kind, tuning_acts=tuning_acts, fingerprint=fingerprint)
            fitted.save(folder)
            print(f"fold {fold}: ITI heads (layer, head) {fitted.heads[:8].tolist()} ... saved to {folder}")
        policies[fold] = ITIPolicy(fitted.heads, fitted.directions, fitted.sigmas, alpha=args.alpha,
                                   fingerprint=fitted.fingerprint, meta=fitted.meta)
    params = {"alpha": args.alpha, "heads": args.num_heads, "dir": kind}
    su.run_method(args, lm, df, folds, "iti", params, lambda fold: policies[fold])


if __name__ == "__main__":
    su.run_main(main)

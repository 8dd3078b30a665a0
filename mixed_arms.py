"""Table 2 of the paper: ITI's head selection with SLIM's intervention, and SLIM's with ITI's.

    python mixed_arms.py llama_7B --arm slim_on_iti_heads --num_heads 48 --kappa 40 --device 0 --num_fold 2
    python mixed_arms.py llama_7B --arm iti_on_slim_layer --alpha 15 --use_center_of_mass --device 0 --num_fold 2

Per fold, --arm slim_on_iti_heads: ITI's top --num_heads heads (ranked by its
probes' validation accuracy over all layers, as validate_2fold.py; read from
its cache when it ran with the same flags), each moved by
kappa * p_h * (A_h a + b_h - a) where its stage-1 probe votes (p_h > 0.5),
with SLIM's map of that head (gamma = --gamma, --cov); no layer detector.
--arm iti_on_slim_layer: at SLIM's chosen layer, when >= tau of its head
probes vote, each voting head is shifted by alpha * sigma_h * direction_h
(ITI's, --use_center_of_mass as the published ITI command). Stage 1's probes
are trained on demand, else read back. The fold's test (or validation)
questions are answered and scored; slim/mixed.py says why the arms are
defined so. Strength 0 (--kappa 0 / --alpha 0) is the unintervened model.
"""

import argparse
import functools

import slim_utils as su
from slim.config import COVARIANCES, TUNING_DATASETS, ITIConfig, SlimConfig, run_config
from slim.data.activations import load_probe_data
from slim.data.folds import questions_and_folds
from slim.evaluation.evaluate import evaluate_methods
from slim.layout import method_name
from slim.policies.base import model_fingerprint
from slim.policies.fit import iti_for_fold
from slim.policies.mixed import iti_on_slim_layer_for_fold, slim_on_iti_heads_for_fold
from slim.stage1.fit import chosen_layers, fit_stage1

ARMS = ("slim_on_iti_heads", "iti_on_slim_layer")


def add_arm_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arm", required=True, choices=ARMS, help="which mixed arm of the paper's Table 2")
    parser.add_argument("--kappa", default="40", help="slim_on_iti_heads' strength, or 'best' (its sweep's choice)")
    parser.add_argument("--alpha", default="15", help="iti_on_slim_layer's ITI strength, or 'best'")
    parser.add_argument("--num_heads", type=int, default=48, help="slim_on_iti_heads: ITI's K heads")
    parser.add_argument("--gamma", type=float, default=0.1, help="slim_on_iti_heads: the maps' tolerance, (0, 0.5)")
    parser.add_argument("--cov", default="empirical", choices=COVARIANCES, help="the maps' covariance (as SLIM)")
    parser.add_argument("--min_samples", type=int, default=None, help="the maps' minimum flagged rows (as SLIM)")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--use_center_of_mass", action="store_true", help="ITI's class-mean difference directions")
    direction.add_argument("--use_random_dir", action="store_true", help="random directions (ablation)")
    parser.add_argument(
        "--tuning_dataset",
        default="tqa_gen_end_q_all",
        choices=TUNING_DATASETS,
        help="activations whose projections give ITI's sigma (as validate_2fold.py)",
    )


def policy_folder(layout, name: str, fold: int):
    """Where a fold's fitted arm is saved (Policy.load reads it back)."""
    return layout.out_dir / "policies" / layout.tag / f"{name}_fold{fold}"


def slim_on_iti_heads_policies(data, folds, fold_probes, slim_cfg, iti_cfg, probe_cfg, layout, fingerprint, tuning):
    """Per fold: ITI's heads (validate_2fold.py's cached fit when it ran with the same flags), SLIM's maps of them
    (SLIM's map cache of their layers)."""
    policies = {}
    for fold, split in enumerate(folds):
        iti_folder = layout.iti_policy(fold, iti_cfg.direction, iti_cfg.num_heads, iti_cfg.tuning_dataset)
        heads = iti_for_fold(data, split, iti_cfg, iti_folder, fingerprint, tuning).heads
        maps_path = functools.partial(layout.maps, fold, slim=slim_cfg, probe=probe_cfg)  # layer -> file
        policies[fold] = slim_on_iti_heads_for_fold(
            data, split, fold_probes[fold], heads, slim_cfg, maps_path, fingerprint
        )
        print(f"fold {fold}: SLIM's maps on ITI's {len(heads)} heads in layers {policies[fold].layers}")
    return policies


def iti_on_slim_layer_policies(data, folds, fold_probes, layers, iti_cfg, fingerprint, tuning):
    """Per fold: stage 1's detector at the chosen layer, ITI's shifts of that layer's heads."""
    policies = {}
    for fold, split in enumerate(folds):
        policy = iti_on_slim_layer_for_fold(data, split, fold_probes[fold], layers[fold], iti_cfg, fingerprint, tuning)
        print(f"fold {fold}: ITI's shifts on SLIM's layer {policy.layer} (fires at >= {policy.tau} votes)")
        policies[fold] = policy
    return policies


def main():
    parser = su.add_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]), su.COMMON_FLAGS)
    su.add_flags(parser, su.PROBE_FLAGS, su.EVAL_FLAGS)
    add_arm_flags(parser)
    args = su.accept_shared(parser).parse_args()
    data_cfg, probe_cfg, eval_cfg = su.data_config(args), su.probe_config(args), su.eval_config(args)
    layout = su.run_layout(args)
    kind = "com" if args.use_center_of_mass else "random" if args.use_random_dir else "probe"
    on_iti_heads = args.arm == "slim_on_iti_heads"
    # each arm reads its own knob only; the other config's strength is a placeholder
    kappa = su.knob(args.kappa, layout, args.arm, "kappa") if on_iti_heads else 0.0
    alpha = 1.0 if on_iti_heads else su.knob(args.alpha, layout, args.arm, "alpha")
    slim_cfg = SlimConfig(args.gamma, kappa, "identity", args.cov, args.min_samples, args.criterion)
    iti_cfg = ITIConfig(args.num_heads, alpha, kind, args.tuning_dataset)

    df, folds = questions_and_folds(data_cfg, layout.splits_dir)
    load = su.model_loader(args)
    data = load_probe_data(df, data_cfg.dataset_name, layout, load, args.batch_size)
    tuning = None
    if iti_cfg.tuning_dataset != "same":
        tuning = load_probe_data(df, "tqa_gen_end_q", layout, load, args.batch_size)
    fold_probes = fit_stage1(data, folds, probe_cfg, layout, data_cfg.dataset_name, su.compute_device(args))
    lm = load()
    fingerprint = model_fingerprint(lm.model)

    config = run_config(model=su.model_settings(args), data=data_cfg, probe=probe_cfg, eval=eval_cfg, arm=args.arm)
    if on_iti_heads:
        params = {"kappa": kappa, "heads": args.num_heads, "gamma": args.gamma, "bl": probe_cfg.bl}
        policies = slim_on_iti_heads_policies(
            data, folds, fold_probes, slim_cfg, iti_cfg, probe_cfg, layout, fingerprint, tuning
        )
        config.update(run_config(slim=slim_cfg, iti_heads={"num_heads": args.num_heads, "direction": kind}))
    else:
        layers = chosen_layers(fold_probes, args.criterion)
        params = {"alpha": alpha, "dir": kind, "bl": probe_cfg.bl}
        policies = iti_on_slim_layer_policies(data, folds, fold_probes, layers, iti_cfg, fingerprint, tuning)
        config.update(run_config(iti=iti_cfg, chosen_layers=layers))
    for fold, policy in policies.items():
        print(f"fold {fold}: policy saved to {policy.save(policy_folder(layout, method_name(args.arm, params), fold))}")

    runs = [(args.arm, params, policies)]
    su.report_summaries(
        args, evaluate_methods(lm, df, folds, runs, eval_cfg, layout, config, data_cfg.tqa_dir, su.print_row)
    )


if __name__ == "__main__":
    su.run_main(main)

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
Several values of the arm's knob (--kappa 10 40) are scored in one process,
each writing the files a run with that value alone would write.
"""

import argparse
import contextlib
import functools

import slim_utils as su
from slim.config import COVARIANCES, TUNING_DATASETS, ITIConfig, SlimConfig, run_config
from slim.data.activations import load_probe_data
from slim.data.folds import questions_and_folds
from slim.evaluation.sweep import at_knob, evaluate_grid
from slim.io import artefact_lock
from slim.layout import method_name
from slim.policies.base import model_fingerprint
from slim.policies.fit import iti_for_fold
from slim.policies.mixed import iti_on_slim_layer_for_fold, slim_on_iti_heads_for_fold
from slim.stage1.fit import chosen_layers, fit_stage1

ARMS = ("slim_on_iti_heads", "iti_on_slim_layer")


def add_arm_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arm", required=True, choices=ARMS, help="which mixed arm of the paper's Table 2")
    parser.add_argument(
        "--kappa", nargs="+", default=["40"], help="slim_on_iti_heads' strength(s), or 'best' (its sweep's choice)"
    )
    parser.add_argument("--alpha", nargs="+", default=["15"], help="iti_on_slim_layer's ITI strength(s), or 'best'")
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
    su.add_flags(parser, su.ITI_FLAGS)


def policy_folder(layout, name: str, fold: int):
    """Where a fold's fitted arm is saved (Policy.load reads it back)."""
    return layout.out_dir / "policies" / layout.tag / f"{name}_fold{fold}"


def slim_on_iti_heads_policies(
    data, folds, fold_probes, slim_cfg, iti_cfg, probe_cfg, layout, fingerprint, tuning, device=None, solver=None
):
    """Per fold: ITI's heads (validate_2fold.py's cached fit when it ran with the same flags; its probes fitted on
    `device`), SLIM's maps of them (SLIM's map cache of their layers)."""
    policies = {}
    for fold, split in enumerate(folds):
        iti_folder = layout.iti_policy(fold, iti_cfg.direction, iti_cfg.num_heads, iti_cfg.tuning_dataset)
        with artefact_lock(iti_folder):  # fitted by one run; another run waiting here reads it back
            heads = iti_for_fold(data, split, iti_cfg, iti_folder, fingerprint, tuning, device, solver=solver).heads
        maps_path = functools.partial(layout.maps, fold, slim=slim_cfg, probe=probe_cfg)  # layer -> file
        with contextlib.ExitStack() as held:  # the maps of every layer the heads touch, in layer order
            for layer in sorted(set(heads[:, 0].tolist())):
                held.enter_context(artefact_lock(maps_path(layer)))
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
    # each arm reads its own knob only (a grid of values); the other config's strength is a placeholder
    knob = "kappa" if on_iti_heads else "alpha"
    values = su.knobs(getattr(args, knob), layout, args.arm, knob)
    slim_cfgs = [
        SlimConfig(args.gamma, v if on_iti_heads else 0.0, "identity", args.cov, args.min_samples, args.criterion)
        for v in values
    ]
    iti_cfgs = [ITIConfig(args.num_heads, 1.0 if on_iti_heads else v, kind, args.tuning_dataset) for v in values]
    slim_cfg, iti_cfg = slim_cfgs[0], iti_cfgs[0]

    df, folds = questions_and_folds(data_cfg, layout.splits_dir)
    load = su.model_loader(args)
    data = load_probe_data(df, data_cfg.dataset_name, layout, load, args.batch_size, verify=args.verify)
    tuning = None
    if iti_cfg.tuning_dataset != "same":
        tuning = load_probe_data(df, "tqa_gen_end_q", layout, load, args.batch_size, verify=args.verify)
    fold_probes = fit_stage1(data, folds, probe_cfg, layout, data_cfg.dataset_name, su.compute_device(args, load))
    lm = load()
    fingerprint = model_fingerprint(lm.model)

    config = run_config(model=su.model_settings(args), data=data_cfg, probe=probe_cfg, eval=eval_cfg, arm=args.arm)
    if on_iti_heads:  # fitted at the first value, the others rescaled
        device = su.compute_device(args, load)
        fitted = slim_on_iti_heads_policies(
            data, folds, fold_probes, slim_cfg, iti_cfg, probe_cfg, layout, fingerprint, tuning, device, args.iti_solver
        )
    else:
        layers = chosen_layers(fold_probes, args.criterion)
        fitted = iti_on_slim_layer_policies(data, folds, fold_probes, layers, iti_cfg, fingerprint, tuning)
    runs = []
    for i, value in enumerate(values):
        policies = {fold: p if i == 0 else at_knob(p, **{knob: value}) for fold, p in fitted.items()}
        if on_iti_heads:
            params = {"kappa": value, "heads": args.num_heads, "gamma": args.gamma, "bl": probe_cfg.bl}
            arm_config = run_config(
                slim=slim_cfgs[i],
                iti_heads={"num_heads": args.num_heads, "direction": kind, "solver": args.iti_solver},
            )
        else:
            params = {"alpha": value, "dir": kind, "bl": probe_cfg.bl}
            arm_config = run_config(iti=iti_cfgs[i], chosen_layers=layers)
        for fold, policy in policies.items():
            folder = su.locked_save(policy, policy_folder(layout, method_name(args.arm, params), fold))
            print(f"fold {fold}: policy saved to {folder}")
        runs.append((args.arm, params, policies, {**config, **arm_config}))
    su.report_summaries(args, evaluate_grid(lm, df, folds, runs, eval_cfg, layout, data_cfg.tqa_dir, su.print_row))


if __name__ == "__main__":
    su.run_main(main)

"""Stages 2-3: head-wise distributional maps at the chosen layer, kappa aggregation, evaluation.

    python ot_edit_layer.py llama_7B --device 0 --num_fold 2 --bl 1.0 --alpha 0.1 --kappa 40 --use_mode test
    python ot_edit_layer.py smollm2_135M --num_fold 2 --alpha 0.1 --kappa 0 10 40 --use_mode val --max_questions 40

Per fold: stage 1's probes (trained on demand, else read back), the edited
layer, one OT map per head of that layer fitted on the train+val activations
its probe flags (gamma = --alpha), then the SLIM policy answers the fold's
test (or, with --use_mode val, validation) questions and is scored. Writes the
policy, the answers and a summary (slim/layout.py names them), and prints the
fold-averaged row. --mimic also scores the MiMiC-style baseline at the same
layer. Several --kappa values (a sweep) are scored in one process: the model,
the probes, the maps and the judges are loaded or fitted once, and each value
writes the files a run with that value alone would write.
"""

import argparse

import slim_utils as su
from slim.config import COVARIANCES, PSI, SlimConfig, run_config
from slim.data.activations import load_probe_data
from slim.data.folds import questions_and_folds
from slim.evaluation.sweep import at_knob, evaluate_grid
from slim.io import artefact_lock
from slim.policies.base import model_fingerprint
from slim.policies.fit import fit_mimic, fold_layer_activations, slim_for_fold
from slim.stage1.fit import chosen_layers, fit_stage1


def main():
    parser = su.add_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]), su.COMMON_FLAGS)
    su.add_flags(parser, su.PROBE_FLAGS, su.EVAL_FLAGS)
    parser.add_argument(
        "--alpha", type=float, default=0.1, help="gamma: the chance constraint's tolerance, in (0, 0.5)"
    )
    parser.add_argument(
        "--kappa",
        nargs="+",
        default=["40"],
        help="aggregation strength, or 'best': the value sweep.sh chose; several values: each scored in turn",
    )
    parser.add_argument("--psi", default="identity", choices=PSI, help="aggregation function of kappa * p * v")
    parser.add_argument(
        "--cov",
        default="empirical",
        choices=COVARIANCES,
        help="the flagged activations' covariance: empirical (published; the least jitter * I when not positive "
        "definite, reported), ledoit_wolf (shrunk) or ridge",
    )
    parser.add_argument(
        "--min_samples",
        type=int,
        default=None,
        help="a head flagging fewer activations keeps the identity map (with a warning); default 2 with "
        "--cov empirical (no minimum, as published, but a covariance needs 2), 10 otherwise",
    )
    parser.add_argument("--mimic", action="store_true", help="also score the MiMiC-style baseline at that layer")
    args = su.accept_shared(parser).parse_args()
    data_cfg, probe_cfg, eval_cfg = su.data_config(args), su.probe_config(args), su.eval_config(args)
    layout = su.run_layout(args)
    cfgs = [  # one per grid value; the maps depend on everything but kappa
        SlimConfig(args.alpha, kappa, args.psi, args.cov, args.min_samples, args.criterion)
        for kappa in su.knobs(args.kappa, layout, "slim", "kappa")
    ]
    cfg = cfgs[0]

    df, folds = questions_and_folds(data_cfg, layout.splits_dir)
    load = su.model_loader(args)
    data = load_probe_data(df, data_cfg.dataset_name, layout, load, args.batch_size, verify=args.verify)
    fold_probes = fit_stage1(data, folds, probe_cfg, layout, data_cfg.dataset_name, su.compute_device(args, load))
    layers = chosen_layers(fold_probes, cfg.criterion)
    lm = load()
    fingerprint = model_fingerprint(lm.model)

    grid, mimics = [{} for _ in cfgs], {}  # grid[i]: {fold: SLIM policy at cfgs[i].kappa}
    for fold, split in enumerate(folds):
        layer = layers[fold]
        acts_layer, labels = fold_layer_activations(data, split, layer)  # read once for SLIM and MiMiC
        maps = layout.maps(fold, layer, cfg, probe_cfg)
        with artefact_lock(maps):  # fitted by one run; another run waiting here reads them back
            fitted = slim_for_fold(acts_layer, fold_probes[fold], layer, cfg, maps, fingerprint)
        for c, policies in zip(cfgs, grid):
            policy = fitted if c is cfg else at_knob(fitted, kappa=c.kappa)
            folder = su.locked_save(policy, layout.slim_policy(fold, layer, c, probe_cfg))
            moved = sum(m["status"] == "moved" for m in policy.meta["maps"])
            print(
                f"fold {fold}: layer {layer}, tau {policy.tau}, {moved}/{len(policy.meta['maps'])} heads with a "
                f"non-identity map; policy saved to {folder}"
            )
            policies[fold] = policy
        if args.mimic:
            mimics[fold] = fit_mimic(acts_layer, labels, layer, fingerprint=fingerprint)

    runs = []
    for c, policies in zip(cfgs, grid):
        config = run_config(
            model=su.model_settings(args), data=data_cfg, probe=probe_cfg, slim=c, eval=eval_cfg, chosen_layers=layers
        )
        params = {"kappa": c.kappa, "gamma": c.gamma, "psi": c.psi, "bl": probe_cfg.bl}
        if probe_cfg.loss_type != "risk":  # Table 3's probe losses are named; the paper's loss is not (older names)
            params["loss"] = probe_cfg.loss_type
        runs.append(("slim", params, policies, config))
    if args.mimic:  # once, with the last value's run config (as the last of single-value runs leaves it)
        mimic_params = {k: v for k, v in params.items() if k in ("bl", "loss")}
        runs.append(("mimic", mimic_params, mimics, config))
    su.report_summaries(args, evaluate_grid(lm, df, folds, runs, eval_cfg, layout, data_cfg.tqa_dir, su.print_row))


if __name__ == "__main__":
    su.run_main(main, flags={"gamma": "--alpha"})

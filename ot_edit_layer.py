"""Stages 2-3: head-wise distributional maps at the chosen layer, kappa aggregation, evaluation.

    python ot_edit_layer.py llama_7B --device 0 --num_fold 2 --bl 1.0 --alpha 0.1 --kappa 40 --use_mode test
    python ot_edit_layer.py smollm2_135M --num_fold 2 --alpha 0.1 --kappa 40 --use_mode val --max_questions 40

Per fold: stage 1's probes (trained on demand, else read back), the edited
layer, one OT map per head of that layer fitted on the train+val activations
its probe flags (gamma = --alpha), then the SLIM policy answers the fold's
test (or, with --use_mode val, validation) questions and is scored. Writes the
policy (validation/policies/), the answers and a summary per fold, and prints
the fold-averaged row. --mimic also scores the MiMiC-style baseline at the
same layer.
"""

import argparse
from pathlib import Path

import numpy as np

import slim_utils as su
from slim.interventions import PSI, fit_mimic, model_fingerprint
from slim.pipeline import chosen_layers, fmt, load_scorers


def main():
    parser = su.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    su.add_probe_args(parser)
    su.add_eval_args(parser)
    parser.add_argument("--alpha", type=float, default=0.1, help="gamma: the chance constraint's tolerance, in (0, 0.5)")
    parser.add_argument("--kappa", default="40", help="aggregation strength (the one tuned knob), or 'best': "
                                                       "the value sweep.sh chose")
    parser.add_argument("--psi", default="identity", choices=PSI, help="aggregation function of kappa * p * v")
    parser.add_argument("--cov", default="ledoit_wolf", choices=("ledoit_wolf", "ridge"),
                        help="how the flagged activations' covariance is made positive definite")
    parser.add_argument("--min_samples", type=int, default=10,
                        help="a head flagging fewer activations keeps the identity map (with a warning)")
    parser.add_argument("--mimic", action="store_true", help="also score the MiMiC-style baseline at that layer")
    args = parser.parse_args()
    su.check_common_args(args)
    cfg = su.probe_config(args)
    args.kappa = su.knob(args.kappa, args, "slim", "kappa")
    if not 0 < args.alpha < 0.5:
        raise ValueError(f"--alpha is gamma here and must lie in (0, 0.5), got {args.alpha}.")
    if not (args.kappa >= 0 and np.isfinite(args.kappa)):
        raise ValueError(f"--kappa must be a finite number >= 0, got {args.kappa}.")

    df, folds = su.questions_and_splits(args)
    data = su.probe_data(args, None, df)
    fold_probes = su.stage1(args, data, folds, cfg)
    layers = chosen_layers(fold_probes, args.criterion)
    lm = su.load_model_from_args(args)
    fingerprint = model_fingerprint(lm.model)
    tag = su.model_tag(args)

    policies, mimics = {}, {}
    for fold, split in enumerate(folds):
        layer, probes = layers[fold], fold_probes[fold]
        rows = su.rows_of(data.texts, np.concatenate([split["train"], split["val"]]))
        acts_layer = np.asarray(data.activations[np.sort(rows), layer], dtype=np.float32)  # (N, H, d)
        maps_path = (Path(args.out_dir) / "maps" / tag /
                     f"fold{fold}_layer{layer}_gamma{fmt(args.alpha)}_{args.cov}_min{args.min_samples}_"
                     f"{cfg.tag()}.safetensors")
        policies[fold] = su.slim_policy(acts_layer, probes, layer, args, maps_path, fingerprint)
        folder = policies[fold].save(Path(args.out_dir) / "policies" / tag /
                                     f"slim_fold{fold}_layer{layer}_gamma{fmt(args.alpha)}_kappa{fmt(args.kappa)}_{args.psi}")
        moved = sum(m["status"] == "moved" for m in policies[fold].meta["maps"])
        print(f"fold {fold}: layer {layer}, tau {policies[fold].tau}, {moved}/{len(policies[fold].meta['maps'])} "
              f"heads with a non-identity map; policy saved to {folder}")
        if args.mimic:
            labels = data.texts["label"].to_numpy()[np.sort(rows)]
            mimics[fold] = fit_mimic(acts_layer, labels, layer, fingerprint=fingerprint)

    params = {"kappa": args.kappa, "gamma": args.alpha, "psi": args.psi, "bl": args.bl}
    scorers = load_scorers(args.judge_name, args.info_name, args.embedder, args.tqa_dir)
    su.run_method(args, lm, df, folds, "slim", params, lambda fold: policies[fold], scorers)
    if args.mimic:
        su.run_method(args, lm, df, folds, "mimic", {"bl": args.bl}, lambda fold: mimics[fold], scorers)


if __name__ == "__main__":
    su.run_main(main)

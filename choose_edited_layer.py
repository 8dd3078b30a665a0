"""Stage 1: risk-aware head probes for every layer, and the choice of the edited layer.

    python choose_edited_layer.py llama_7B --dataset_name tqa_mc2 --device 0 --num_fold 2 --bl 1.0
    python choose_edited_layer.py smollm2_135M --num_fold 2 --bl 1.0 --figure_bls 0.6 0.8 1.0 1.2 1.4 2.0

Writes, under --out_dir (validation/): the probes of each fold, one table of
per-layer validation metrics, the chosen layer per fold, and the paper's
Figure 1 as PNG files under <out_dir>/figures/ (or --paper_dir). File names:
slim/layout.py.
"""

import argparse
from dataclasses import asdict

import pandas as pd

import slim_utils as su
from slim.data.activations import load_probe_data
from slim.data.folds import questions_and_folds
from slim.evaluation.reports import plot_fnr_by_bl, plot_fnr_fpr
from slim.io import artefact_lock, write_csv, write_json
from slim.stage1.fit import chosen_layers, fit_stage1, layer_table


def main():
    parser = su.add_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]), su.COMMON_FLAGS)
    su.add_flags(parser, su.PROBE_FLAGS)
    parser.add_argument(
        "--figure_bls",
        type=float,
        nargs="*",
        default=None,
        help="also train probes for these bl values and draw Figure 1(b) (paper: 0.6 ... 2.0)",
    )
    parser.add_argument("--no_figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--paper_dir", default=None, help="where the figures go (default <out_dir>/figures)")
    args = su.accept_shared(parser).parse_args()
    cfg = su.probe_config(args)  # bad settings fail here, before any model or data is loaded
    bl_cfgs = [cfg.with_bl(bl) for bl in args.figure_bls or []]
    data_cfg = su.data_config(args)
    layout = su.run_layout(args, figure_dir=args.paper_dir)

    df, folds = questions_and_folds(data_cfg, layout.splits_dir)
    load = su.model_loader(args)
    data = load_probe_data(df, data_cfg.dataset_name, layout, load, args.batch_size, verify=args.verify)
    device = su.compute_device(args, load)
    fold_probes = fit_stage1(data, folds, cfg, layout, data_cfg.dataset_name, device)
    table = layer_table(fold_probes, cfg)
    layers = chosen_layers(fold_probes, args.criterion)
    chosen = {
        "model": layout.model,
        "criterion": args.criterion,
        "probe_settings": cfg.tag(),
        "data": asdict(data_cfg),
        "chosen_layer": {str(k): v for k, v in layers.items()},
    }
    with artefact_lock(layout.layer_metrics(cfg)), artefact_lock(layout.chosen_layer(cfg)):
        write_csv(table, layout.layer_metrics(cfg))
        write_json(layout.chosen_layer(cfg), chosen)
    for fold, layer in layers.items():
        row = table[(table.fold == fold) & (table.layer == layer)].iloc[0]
        print(
            f"fold {fold}: chosen layer {layer} ({args.criterion}) -- tau {row.tau}, val loss {row.val_loss:.3f}, "
            f"FPR {row.fpr:.3f}, FNR {row.fnr:.3f}, acc {row.acc:.3f}, F1 {row.f1:.3f}"
        )
    if args.no_figures:
        return
    name = (args.model_dir or args.model_name) + (f", first {args.n_questions} questions" if args.n_questions else "")
    figure = layout.figure("figure1a", "fnr_fpr_by_layer")
    with artefact_lock(figure):
        print(f"Figure 1(a): {plot_fnr_fpr(table, name, cfg.bl, figure)}")
    if bl_cfgs:
        sweep = pd.concat(
            [layer_table(fit_stage1(data, folds, c, layout, data_cfg.dataset_name, device), c) for c in bl_cfgs],
            ignore_index=True,
        )
        figure = layout.figure("figure1b", "fnr_by_bl")
        with artefact_lock(layout.bl_sweep_metrics()), artefact_lock(figure):
            write_csv(sweep, layout.bl_sweep_metrics())
            print(f"Figure 1(b): {plot_fnr_by_bl(sweep, name, figure)}")


if __name__ == "__main__":
    su.run_main(main)

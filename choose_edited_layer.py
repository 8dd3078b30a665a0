"""Stage 1: risk-aware head probes for every layer, and the choice of the edited layer.

    python choose_edited_layer.py llama_7B --dataset_name tqa_mc2 --device 0 --num_fold 2 --bl 1.0
    python choose_edited_layer.py smollm2_135M --num_fold 2 --bl 1.0 --figure_bls 0.6 0.8 1.0 1.2 1.4 2.0

Writes, under --out_dir (validation/): the probes of each fold
(probes/<model>/fold<k>_<data>_<settings>.safetensors), one tidy table of
per-layer validation metrics (<model>_layer_metrics_<settings>.csv), the chosen
layer per fold (<model>_chosen_layer_<settings>.json), and the paper's Figure 1
as PNG files under paper/. With --n_questions N the tables and figures are
named <model>_first<N>_..., apart from the full-data ones.
"""

import argparse
from pathlib import Path

import slim_utils as su
from slim.io import write_csv, write_json
from slim.pipeline import ProbeConfig, chosen_layers, layer_table
from slim.reports import plot_fnr_by_bl, plot_fnr_fpr


def main():
    parser = su.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    su.add_probe_args(parser)
    parser.add_argument("--figure_bls", type=float, nargs="*", default=None,
                        help="also train probes for these bl values and draw Figure 1(b) (paper: 0.6 ... 2.0)")
    parser.add_argument("--no_figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--paper_dir", default=str(su.PAPER_DIR), help="where the figures go")
    args = parser.parse_args()
    cfg = su.probe_config(args)  # bad settings fail here, before any model or data is loaded
    for bl in args.figure_bls or []:
        ProbeConfig(cfg.loss_type, bl, cfg.beta, cfg.epochs, cfg.lr, cfg.seed).check()
    su.check_common_args(args)

    df, folds = su.questions_and_splits(args)
    data = su.probe_data(args, None, df)
    fold_probes = su.stage1(args, data, folds, cfg)
    table = layer_table(fold_probes, cfg)
    layers = chosen_layers(fold_probes, args.criterion)

    tag = su.model_tag(args)
    # a question subset (quick mode) gets its own files, never overwriting the full-data tables and figures
    out_tag = su.subset_tag(args, tag)
    out = Path(args.out_dir)
    write_csv(table, out / f"{out_tag}_layer_metrics_{cfg.tag()}.csv")
    write_json(out / f"{out_tag}_chosen_layer_{cfg.tag()}.json",
                      {"model": tag, "criterion": args.criterion, "probe_settings": cfg.tag(),
                       "chosen_layer": {str(k): v for k, v in layers.items()}})
    for fold, layer in layers.items():
        row = table[(table.fold == fold) & (table.layer == layer)].iloc[0]
        print(f"fold {fold}: chosen layer {layer} ({args.criterion}) -- tau {row.tau}, val loss {row.val_loss:.3f}, "
              f"FPR {row.fpr:.3f}, FNR {row.fnr:.3f}, acc {row.acc:.3f}, F1 {row.f1:.3f}")

    if not args.no_figures:
        name = args.model_dir or args.model_name
        if args.n_questions:
            name = f"{name}, first {args.n_questions} questions"
        fig_a = plot_fnr_fpr(table, name, cfg.bl, Path(args.paper_dir) / f"figure1a_{out_tag}_fnr_fpr_by_layer.png")
        print(f"Figure 1(a): {fig_a}")
        if args.figure_bls:
            tables = []
            for bl in args.figure_bls:
                cfg_bl = ProbeConfig(cfg.loss_type, bl, cfg.beta, cfg.epochs, cfg.lr, cfg.seed)
                tables.append(layer_table(su.stage1(args, data, folds, cfg_bl), cfg_bl))
            import pandas as pd
            sweep = pd.concat(tables, ignore_index=True)
            write_csv(sweep, out / f"{out_tag}_layer_metrics_bl_sweep.csv")
            fig_b = plot_fnr_by_bl(sweep, name, Path(args.paper_dir) / f"figure1b_{out_tag}_fnr_by_bl.png")
            print(f"Figure 1(b): {fig_b}")


if __name__ == "__main__":
    su.run_main(main)

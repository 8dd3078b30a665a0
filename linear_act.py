"""Baseline: Linear-AcT (Rodriguez et al., 2024), per-dimension affine optimal transport of the head activations.

    python linear_act.py llama_7B --device 0 --num_fold 2 --strength 1.0 --use_mode test
    python linear_act.py smollm2_135M --num_fold 2 --strength 0.5 --layers 10 11 12 --use_mode val --max_questions 40
    python linear_act.py smollm2_135M --num_fold 2 --strength 0 0.25 0.5 1 --use_mode val --max_questions 40

Per fold: for every head dimension of every edited layer (--layers, default
all), the affine least-squares fit of the 1-D OT map from the untruthful to the
truthful probe texts' last-token activations (sorted samples, matched
quantiles when the counts differ), fitted on the fold's train+val rows; at the
last position of every forward call, an activation inside the untruthful
class's observed range moves by lambda * (T(x) - x) (lambda = --strength),
one outside it stays. The fold's test (or validation) questions are answered
and scored; a summary per fold and the fold average are written (named
<model>_linear_act_strength<l>[_layers<a-b-c>]_<split>). Several --strength
values are scored in one process (the model, the maps and the judges loaded or
fitted once), each writing the files a run with that value alone would write.
slim/linear_act.py says where this differs from the authors' setting.
"""

import argparse

import slim_utils as su
from slim.config import run_config
from slim.data.activations import load_probe_data
from slim.data.folds import questions_and_folds
from slim.evaluation.sweep import at_knob, evaluate_grid
from slim.policies.base import model_fingerprint
from slim.policies.linear_act import PAIRING, check_strength, linear_act_for_fold


def main():
    parser = su.add_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]), su.COMMON_FLAGS)
    su.add_flags(parser, su.EVAL_FLAGS)
    parser.add_argument(
        "--strength",
        nargs="+",
        default=["1.0"],
        help="lambda in [0, 1]: 0 = the unintervened model, 1 = the full map; 'best': the value the sweep chose "
        "(python -m slim.evaluation.sweep --method linear_act --param strength); several values: each scored in turn",
    )
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="layers to transport (default: every layer)"
    )
    args = su.accept_shared(parser).parse_args()
    data_cfg, eval_cfg = su.data_config(args), su.eval_config(args)
    layout = su.run_layout(args)
    strengths = [check_strength(v) for v in su.knobs(args.strength, layout, "linear_act", "strength")]
    layers = sorted(set(args.layers)) if args.layers else None

    df, folds = questions_and_folds(data_cfg, layout.splits_dir)
    load = su.model_loader(args)
    data = load_probe_data(df, data_cfg.dataset_name, layout, load, args.batch_size, verify=args.verify)
    lm = load()
    fingerprint = model_fingerprint(lm.model)
    fitted = {  # the maps do not depend on lambda: fitted once, for every value
        fold: linear_act_for_fold(data, split, layers, strengths[0], fingerprint) for fold, split in enumerate(folds)
    }
    config = run_config(model=su.model_settings(args), data=data_cfg, eval=eval_cfg)
    runs = []
    for i, strength in enumerate(strengths):
        policies = {fold: p if i == 0 else at_knob(p, strength=strength) for fold, p in fitted.items()}
        params = {"strength": strength}
        if layers:  # a subset is part of the summary's name; every layer (the default) is not
            params["layers"] = "-".join(map(str, layers))
        linear_act = {"strength": strength, "layers": layers or "all", "pairing": PAIRING}
        runs.append(("linear_act", params, policies, {**config, "linear_act": linear_act}))
    su.report_summaries(args, evaluate_grid(lm, df, folds, runs, eval_cfg, layout, data_cfg.tqa_dir, su.print_row))


if __name__ == "__main__":
    su.run_main(main, flags={"strength": "--strength"})

"""Stage 0: cache the head-wise activations of the probe texts (the later stages call this on demand).

python extract_activations.py smollm2_135M --dataset_name tqa_mc2
"""

import argparse
import json

import slim_utils as su
from slim.data.activations import load_probe_data
from slim.data.folds import questions_and_folds


def main():
    args = su.add_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]), su.COMMON_FLAGS).parse_args()
    data_cfg = su.data_config(args)
    layout = su.run_layout(args)
    df, _ = questions_and_folds(data_cfg, layout.splits_dir)
    path = layout.features(data_cfg.dataset_name)
    data = load_probe_data(
        df, data_cfg.dataset_name, layout, su.model_loader(args), args.batch_size, verify=args.verify
    )
    info = json.loads(path.with_suffix(".json").read_text())
    n, L, H, d = data.activations.shape
    print(
        f"{args.dataset_name}: {n} texts x {L} layers x {H} heads x {d} dims, float16, in {path} "
        f"(extraction time {info.get('seconds', 0):.0f} s)"
    )


if __name__ == "__main__":
    su.run_main(main)

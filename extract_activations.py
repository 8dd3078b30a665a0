"""Stage 0: cache the head-wise activations of the probe texts (the later stages call this on demand).

    python extract_activations.py smollm2_135M --dataset_name tqa_mc2
"""

import argparse
import json
from pathlib import Path

import slim_utils as su


def main():
    parser = su.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    df, _ = su.questions_and_splits(args)
    data = su.probe_data(args, None, df)
    manifest = Path(args.out_dir) / "features" / f"{su.model_tag(args)}_{su.data_tag(args)}_head_wise.json"
    info = json.loads(manifest.read_text())
    print(f"{args.dataset_name}: {data.activations.shape[0]} texts x {data.activations.shape[1]} layers x "
          f"{data.activations.shape[2]} heads x {data.activations.shape[3]} dims, float16, in {manifest.parent} "
          f"(extraction time {info.get('seconds', 0):.0f} s)")


if __name__ == "__main__":
    su.run_main(main)

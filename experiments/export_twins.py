"""Export the synthetic twins as LLaVA conversation JSON + a PNG image folder, the format the
training data path reads (analysis/training/llava_data.py), so the tiny model trains through it.

    python experiments/export_twins.py --out outputs/llava-twins --n 500 --split train --seed 0
    # -> outputs/llava-twins/train.json, outputs/llava-twins/images/*.png  (image folder: outputs/llava-twins)
"""

from __future__ import annotations

import argparse

from analysis import twins
from analysis.training.llava_data import export_twins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for <split>.json and images/")
    parser.add_argument("--n", type=int, required=True, help="samples per twin (records: n x number of twins)")
    parser.add_argument("--split", default="train", choices=list(twins.SPLITS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--twins", nargs="+", default=list(twins.TWINS), choices=[*twins.TWINS, *twins.HR_TWINS],
                        help="default: the four 64 px twins; the synth_*_hr ones are 128 px (pictures only: "
                             "the video twin has no LLaVA-format export)")
    parser.add_argument("--image-size", type=int, default=None, help="default: each twin's own (64, or 128 for _hr)")
    args = parser.parse_args()
    path = export_twins(args.out, args.n, args.split, args.seed, args.twins, args.image_size)
    print(f"{path}  ({args.n * len(args.twins)} records; image folder {args.out})")


if __name__ == "__main__":
    main()

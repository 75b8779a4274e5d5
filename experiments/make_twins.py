"""Write the twins' parquet splits (the task yamls read data/twins/<twin>/eval.parquet).

    python experiments/make_twins.py                       # eval splits, 200 each, seed 1234
    python experiments/make_twins.py --splits train --n 20000 --seed 0
    python experiments/make_twins.py --twins synth_video   # clips as data/twins/synth_video/videos/*.mp4
"""

from __future__ import annotations

import argparse

from analysis import twins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--twins", nargs="+", default=list(twins.TWINS), choices=list(twins.ALL_TWINS),
                        help="default: the four 64 px twins; the synth_*_hr ones are 128 px, synth_video is video")
    parser.add_argument("--splits", nargs="+", default=["eval"], choices=list(twins.SPLITS))
    parser.add_argument("--n", type=int, default=twins.EVAL_SIZE, help="samples per twin and split")
    parser.add_argument("--seed", type=int, default=twins.EVAL_SEED)
    parser.add_argument("--image-size", type=int, default=None, help="default: each twin's own (64, or 128 for _hr)")
    parser.add_argument("--out", default=str(twins.DATA_DIR))
    args = parser.parse_args()
    for name in args.twins:
        for split in args.splits:
            path = twins.write_split(name, split, args.n, args.seed, args.out, args.image_size)
            print(f"{path}  ({path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()

"""The first fine-tuning epoch: its validation accuracy against the head's last.

A fresh optimizer at full rate on newly unfrozen layers often costs accuracy
for an epoch before it gains. For each folder, seed and `--fine-tune-warmup`
fraction this runs `tftransfer train` (whole processes, one cache per folder,
so only the first run of a folder computes its features and activations) and
prints the first fine-tuning epoch's validation accuracy minus the head
phase's final one (the "dip"; target at least -0.02) and the final accuracy.

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/warmup.py \
      ../shared/data/hymenoptera --epochs 5 --fine-tune-epochs 5 \
      --seeds 0 1 2 3 --warmups 0 0.3 1
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from frozen_phase import timed  # noqa: E402  (a sibling script)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dirs", nargs="+")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--warmups", type=float, nargs="+", default=[0, 0.3, 1])
    parser.add_argument("--alpha", type=float, default=0.75)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more options for `tftransfer train`")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for data_dir in args.data_dirs:
            cache = os.path.join(tmp, "cache-" + os.path.basename(data_dir.rstrip("/")))
            for seed in args.seeds:
                for warmup in args.warmups:
                    _, out = timed([
                        sys.executable, "-m", "tftransfer", "train", data_dir,
                        "--output", os.path.join(tmp, "run"), "--overwrite",
                        "--backbone", "mobilenet", "--alpha", str(args.alpha),
                        "--epochs", str(args.epochs),
                        "--fine-tune-epochs", str(args.fine_tune_epochs),
                        "--fine-tune-warmup", str(warmup), "--seed", str(seed),
                        "--cache-dir", cache, "--json", *args.extra])
                    accuracy = out["history"]["val_accuracy"]
                    dip = accuracy[args.epochs] - accuracy[args.epochs - 1]
                    row = {"dip": dip, "final": accuracy[-1],
                           "head": accuracy[args.epochs - 1]}
                    results.setdefault(data_dir, {}).setdefault(warmup, []).append(row)
                    print(f"{data_dir} seed {seed} warm-up {warmup}: "
                          + json.dumps({k: round(v, 4) for k, v in row.items()}),
                          flush=True)
    print(f"\n{'folder':40s} {'warm-up':>8s} {'dips (per seed)':>32s} "
          f"{'mean':>7s} {'worst':>7s} {'final':>7s}")
    for data_dir, by_warmup in results.items():
        for warmup, rows in by_warmup.items():
            dips = [row["dip"] for row in rows]
            print(f"{os.path.basename(data_dir.rstrip('/')):40s} {warmup:8g} "
                  f"{' '.join(f'{d:+.3f}' for d in dips):>32s} "
                  f"{statistics.mean(dips):+7.3f} {min(dips):+7.3f} "
                  f"{statistics.mean(row['final'] for row in rows):7.3f}")
    print("target: every dip at least -0.02; final accuracy no lower than "
          "without warm-up")
    print(json.dumps({data_dir: {str(w): rows for w, rows in by_warmup.items()}
                      for data_dir, by_warmup in results.items()}))


if __name__ == "__main__":
    main()

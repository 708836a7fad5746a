"""Soups and ensembles of fine-tuned seeds against their members, on held-out images.

Three runs fine-tuned from the same ImageNet weights with seeds 0, 1, 2; then
`tftransfer soup --greedy`, `tftransfer soup` (uniform) and `tftransfer
ensemble` of them. A folder with `train/` and `val/` (hymenoptera) is laid out
again as `train/` and `test/` (links, nothing copied): validation is carved
from `train/` by each run, and every model is scored on `test/`, which no
selection saw. The greedy soup selects on the first run's validation split.

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/soup.py \
      ../shared/data/hymenoptera --epochs 5 --fine-tune-epochs 5
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
    parser.add_argument("data_dir", help="a folder with train/ and val/ (or validation/)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.75)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    held_out = next(os.path.join(args.data_dir, name) for name in ("val", "validation")
                    if os.path.isdir(os.path.join(args.data_dir, name)))
    tftransfer = [sys.executable, "-m", "tftransfer"]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        os.symlink(os.path.abspath(os.path.join(args.data_dir, "train")),
                   os.path.join(data, "train"))
        os.symlink(os.path.abspath(held_out), os.path.join(data, "test"))

        def test_accuracy(model):
            return timed([*tftransfer, "evaluate", model, os.path.join(data, "test"),
                          "--json"])[1]["accuracy"]

        rows, runs = {}, []
        for seed in args.seeds:
            run = os.path.join(tmp, f"seed-{seed}")
            seconds, out = timed([*tftransfer, "train", data, "--output", run,
                                  "--backbone", "mobilenet", "--alpha", str(args.alpha),
                                  "--epochs", str(args.epochs),
                                  "--fine-tune-epochs", str(args.fine_tune_epochs),
                                  "--seed", str(seed), "--no-report",
                                  "--cache-dir", os.path.join(tmp, "cache"), "--json"])
            runs.append(run)
            rows[f"seed {seed}"] = {"val": out["val_accuracy"],
                                    "test": test_accuracy(run), "seconds": seconds}
            print(f"seed {seed}: {json.dumps(rows[f'seed {seed}'])}", flush=True)
        for name, command in (("greedy soup", ["soup", *runs, "--greedy"]),
                              ("uniform soup", ["soup", *runs]),
                              ("ensemble", ["ensemble", *runs])):
            out_dir = os.path.join(tmp, name.replace(" ", "-"))
            seconds, out = timed([*tftransfer, *command, "--output", out_dir, "--json"])
            rows[name] = {"val": out["val_accuracy"], "test": test_accuracy(out_dir),
                          "seconds": seconds,
                          "weights": [m["weight"] for m in out["members"]]}
            print(f"{name}: {json.dumps(rows[name])}", flush=True)
    members = [rows[f"seed {seed}"]["test"] for seed in args.seeds]
    print(f"\n{'':14s} {'val':>7s} {'test':>7s} {'seconds':>8s}")
    for name, row in rows.items():
        val = "n/a" if row["val"] is None else f"{row['val']:.4f}"
        print(f"{name:14s} {val:>7s} {row['test']:7.4f} {row['seconds']:8.1f}")
    mean = statistics.mean(members)
    print(f"members' mean test accuracy {mean:.4f}, best {max(members):.4f}; greedy "
          f"soup {rows['greedy soup']['test'] - mean:+.4f} against the mean (target "
          ">= 0)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

"""`--learning-rate auto --fine-tune-learning-rate auto` against the defaults.

For each seed of --seeds, two whole `train_run`s on one image folder, same
epochs, same seed, each with an empty feature cache: the default rates (1e-2,
then 1e-4), and both rates found by the range test. With --held-out, a fifth
of each class (by file-name hash, `fusion.held_out_layout`; a folder's own
`val/` or `validation/` beside `train/`) is laid out as `test/`, which no run
or choice sees: the runs' validation is carved from the rest. Prints each
run's validation and test accuracy, its rates and time, the report's share
of it (target: at most 5% on 3,000 images), and the means over the seeds
(target: auto at least as accurate on test as the defaults).

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/auto_rates.py \
      ../shared/data/flowers128 --epochs 3 --fine-tune-epochs 2 --held-out
"""

import json
import os
import statistics
import tempfile

from fusion import held_out_layout  # benchmarks/fusion.py, beside this
from lr_find import AUTO, run_config, run_parser  # benchmarks/lr_find.py

from tftransfer.run import train_run


def main():
    parser = run_parser()
    parser.add_argument("--only", choices=("defaults", "auto"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--held-out", action="store_true",
                        help="lay out a fifth of each class as an unseen test split")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as data:
        if args.held_out:
            args.data_dir = held_out_layout(args.data_dir, os.path.join(data, "data"))
        for seed in args.seeds:
            for name, rates in (("defaults", {}), ("auto", AUTO)):
                if args.only not in (None, name):
                    continue
                with tempfile.TemporaryDirectory() as folder:
                    summary = train_run(run_config(
                        args, output=folder + "/run", cache_dir=folder + "/cache",
                        seed=seed, **rates)).summary
                images = summary["num_train"] + summary["num_validation"]
                row = {key: summary.get(key) for key in (
                    "val_accuracy", "test_accuracy", "learning_rate",
                    "fine_tune_learning_rate", "seconds", "report_seconds")}
                row["lr_find_seconds"] = summary["timings"].get("lr_find", 0.0)
                results.setdefault(name, []).append(row)
                print(f"seed {seed}, {name}: val_accuracy {summary['val_accuracy']:.4f}"
                      + (f", test_accuracy {summary['test_accuracy']:.4f}"
                         if "test_accuracy" in summary else "")
                      + f", rates {summary['learning_rate']:.3g} / "
                      f"{summary['fine_tune_learning_rate']:.3g}, "
                      f"{summary['seconds']:.1f} s (lr_find "
                      f"{row['lr_find_seconds']:.1f} s), report "
                      f"{summary['report_seconds']:.1f} s = "
                      f"{summary['report_seconds'] / summary['seconds']:.1%} "
                      f"({images} images)", flush=True)
    for name, rows in results.items():
        means = {key: statistics.fmean(row[key] for row in rows)
                 for key in ("val_accuracy", "test_accuracy")
                 if all(row[key] is not None for row in rows)}
        print(f"{name}, mean of {len(rows)}: " + ", ".join(
            f"{key} {value:.4f}" for key, value in means.items()), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

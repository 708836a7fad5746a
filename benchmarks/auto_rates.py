"""`--learning-rate auto --fine-tune-learning-rate auto` against the defaults.

Two whole `train_run`s on one image folder, same epochs, same seed, each with
an empty feature cache: the default rates (1e-2, then 1e-4), and both rates
found by the range test. Prints each run's validation (and test, if the
folder has one) accuracy, its time, and the report's share of it (target: at
most 5% on 3,000 images).

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/auto_rates.py \
      ../shared/data/flowers128 --epochs 3 --fine-tune-epochs 2
"""

import json
import tempfile

from lr_find import run_config, run_parser  # benchmarks/lr_find.py, beside this

from tftransfer.run import train_run


def main():
    parser = run_parser()
    parser.add_argument("--only", choices=("defaults", "auto"))
    args = parser.parse_args()
    results = {}
    for name, rates in (("defaults", {}),
                        ("auto", {"learning_rate": "auto",
                                  "fine_tune_learning_rate": "auto"})):
        if args.only not in (None, name):
            continue
        with tempfile.TemporaryDirectory() as folder:
            summary = train_run(run_config(
                args, output=folder + "/run", cache_dir=folder + "/cache",
                **rates)).summary
        images = summary["num_train"] + summary["num_validation"]
        results[name] = {key: summary.get(key) for key in (
            "val_accuracy", "test_accuracy", "learning_rate",
            "fine_tune_learning_rate", "seconds", "report_seconds")}
        print(f"{name}: val_accuracy {summary['val_accuracy']:.4f}"
              + (f", test_accuracy {summary['test_accuracy']:.4f}"
                 if "test_accuracy" in summary else "")
              + f", rates {summary['learning_rate']:.3g} / "
              f"{summary['fine_tune_learning_rate']:.3g}, {summary['seconds']:.1f} s, "
              f"report {summary['report_seconds']:.1f} s = "
              f"{summary['report_seconds'] / summary['seconds']:.1%} ({images} "
              "images)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""The learning-rate finder against a grid search, per phase, in one run.

For one image folder and backbone:

  grid     the head (on cached features) trained for --epochs at each rate of
           a grid from 1e-5 to 1e-1 (half decades), from the same start; then,
           from one head trained at the default rate, the unfrozen top (on
           cached activations) trained for --fine-tune-epochs at each rate,
           with the optimizer `train` fine-tunes with (its warm-up and the
           weights' average, validated on the average).
           The best rate has the highest final validation accuracy, ties
           (within 0.005) broken by the lower validation loss.
  finder   `lr_find` on the same features / activations, from the same start.
  run      one whole `train_run` with the same epochs and an empty cache
           (features and activations computed, trained, exported): what the
           finder's seconds are compared with.

Prints, per phase, the suggestion, the best grid rate, their ratio (target:
within a factor 3) and the finder's cost as a share of the run (target: at
most 10%); and the run's report time as a share of the run (target: at most
5% on 3,000 images).

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/lr_find.py \
      ../shared/data/cats_and_dogs --backbone mobilenet_v2 --alpha 0.35
"""

import argparse
import json
import tempfile
import time

import keras

from tftransfer.backbones import load_backbone
from tftransfer.engine import Engine
from tftransfer.examples import FolderExamples
from tftransfer.folders import scan_image_folder
from tftransfer.heads import build_classifier
from tftransfer.lr_find import FINE_TUNE_RANGE, lr_find
from tftransfer.run import schedule_of, train_run
from tftransfer.settings import TrainConfig
from tftransfer.train import compile_classifier, warm_adam

GRID = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def best_rate(results: dict) -> float:
    top = max(accuracy for accuracy, _ in results.values())
    near = {rate: loss for rate, (accuracy, loss) in results.items()
            if accuracy >= top - 0.005}
    return min(near, key=near.get)


def grid(network, train, validation, start, epochs, optimizer=None):
    """Final validation accuracy and loss at each rate of `GRID`, from `start`.

    `optimizer(rate)`, if given, makes the optimizer (fine-tuning's, with the
    weights' average `train` keeps, validated on the average as `train` does).
    """
    results = {}
    for rate in GRID:
        network.set_weights(start)
        compile_classifier(network, rate, False,
                           optimizer=optimizer(rate) if optimizer else None)
        averaged = bool(optimizer) and network.optimizer.use_ema
        history = network.fit(train, validation_data=validation, epochs=epochs,
                              verbose=0, callbacks=[keras.callbacks.SwapEMAWeights()]
                              if averaged else [])
        results[rate] = (history.history["val_accuracy"][-1],
                         history.history["val_loss"][-1])
        print(f"  {rate:g}: val_accuracy {results[rate][0]:.4f} "
              f"val_loss {results[rate][1]:.4f}", flush=True)
    network.set_weights(start)
    return results


def run_parser() -> argparse.ArgumentParser:
    """The run both learning-rate benchmarks measure (auto_rates.py too)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--alpha", type=float, default=0.35)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fine-tune-epochs", type=int, default=2)
    return parser


def run_config(args, **settings) -> TrainConfig:
    """The `TrainConfig` of `run_parser`'s arguments, quiet, with `settings`."""
    return TrainConfig(args.data_dir, backbone=args.backbone, alpha=args.alpha,
                       epochs=args.epochs, fine_tune_epochs=args.fine_tune_epochs,
                       verbose=0, **settings)


def main():
    args = run_parser().parse_args()
    config = run_config(args, cache_dir=tempfile.mkdtemp())
    keras.utils.set_random_seed(0)
    backbone = load_backbone(config.network, config.weights, None, config.alpha)
    size = int(backbone.input_shape[1])
    folder = scan_image_folder(config.data_dir, config.validation_split, config.seed)
    model = build_classifier(backbone, len(folder.class_names), config.dropout)
    engine = Engine(model, FolderExamples(folder, size, config.batch_size),
                    schedule_of(config))
    report = {}

    head, train, validation = engine.head_data()
    start = head.get_weights()
    print("head grid:", flush=True)
    results = grid(head, train, validation, start, args.epochs)
    found = lr_find(head, train)
    report["head"] = {"grid": results, "best": best_rate(results),
                      "suggested": found.suggested_learning_rate,
                      "finder_seconds": found.seconds}

    compile_classifier(head, config.learning_rate, False)
    head.fit(train, validation_data=validation, epochs=args.epochs, verbose=0)
    trained = model.get_weights()
    network, train, validation = engine.fine_tune_data()
    print("fine-tune grid:", flush=True)
    # Fine-tuning's optimizer as `train` makes it: warm-up and weights' average.
    momentum = engine.ema("fine_tune", train)
    warmup = round(engine.schedule.fine_tune_warmup * engine.steps_per_epoch(train))
    results = grid(network, train, validation, network.get_weights(),
                   args.fine_tune_epochs,
                   optimizer=lambda rate: warm_adam(rate, warmup, momentum))
    model.set_weights(trained)
    found = lr_find(network, train, **FINE_TUNE_RANGE)
    report["fine_tune"] = {"grid": results, "best": best_rate(results),
                           "suggested": found.suggested_learning_rate,
                           "finder_seconds": found.seconds}

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output:
        summary = train_run(run_config(args, output=output + "/run",
                                       cache_dir=output + "/cache")).summary
    run_seconds = time.perf_counter() - started
    print(f"report: {summary['report_seconds']:.1f} s = "
          f"{summary['report_seconds'] / run_seconds:.1%} of the run "
          f"({summary['num_train'] + summary['num_validation']} images)")
    for phase, result in report.items():
        ratio = result["suggested"] / result["best"]
        share = result["finder_seconds"] / run_seconds
        print(f"{phase}: suggested {result['suggested']:.3g}, grid best "
              f"{result['best']:g} (val_accuracy {result['grid'][result['best']][0]:.4f}"
              f"), ratio {ratio:.2f} ({'within' if 1 / 3 <= ratio <= 3 else 'NOT within'}"
              f" 3x); finder {result['finder_seconds']:.1f} s = {share:.1%} of one "
              f"run ({run_seconds:.1f} s)", flush=True)
        result["grid"] = {str(k): v for k, v in result["grid"].items()}
    print(json.dumps({"run_seconds": run_seconds, **report}))


if __name__ == "__main__":
    main()

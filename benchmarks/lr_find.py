"""The learning-rate finder against a grid search, per phase, over seeds.

For one image folder and backbone, for each seed of --seeds (the seed sets
the split, the head's start and the batches' order):

  grid     the head (on cached features) trained for --epochs at each rate of
           a grid from 1e-5 to 1e-1 (half decades), from the same start; then,
           from the head trained at the rate the finder found (as
           `--learning-rate auto` trains it), the unfrozen top (on cached
           activations) trained for --fine-tune-epochs at each rate, with the
           optimizer `train` fine-tunes with (its warm-up and the weights'
           average, validated on the average).
  finder   the engine's own range test (`Engine.find_rate`) on the same
           features / activations, from the same start: for fine-tuning
           through the phase's compiled `fit`, with the ceiling (a tenth of
           the head's rate), as `--fine-tune-learning-rate auto` runs it.

The grid's accuracies and losses are averaged over the seeds; the best rate
has the highest mean final validation accuracy. Printed beside it: the best
by the earlier rule (ties within 0.005 broken by the lower mean validation
loss), and the rates within one binomial standard error of the best mean
accuracy on the validation images, which that sample cannot tell apart. The
suggestion is the geometric mean of the seeds' suggestions. Prints, per phase, the ratio of
suggestion to best rate (target: within a factor 3) and each seed's.

  cost     --rounds pairs of whole `train_run`s with the same epochs and an
           empty cache each (features and activations computed, trained,
           exported, reported): one at fixed rates (the defaults), one with
           `--learning-rate auto --fine-tune-learning-rate auto`, alternating
           which goes first. The finder's cost in a pair is the auto run's
           `lr_find`, `head` and `fine_tune` stages less the fixed run's
           `head` and `fine_tune` (fine-tuning's range test shares its traced
           step with the training after it, so its cost is only seen so).
           Median over the rounds, as a share of the fixed run (target: at
           most 10%); and the report's share of the run (target: at most 5%
           on 3,000 images).

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/lr_find.py \
      ../shared/data/cats_and_dogs --backbone mobilenet_v2 --alpha 0.35
"""

import argparse
import json
import math
import statistics
import tempfile

import keras

from tftransfer.backbones import load_backbone
from tftransfer.engine import Engine
from tftransfer.examples import FolderExamples
from tftransfer.folders import scan_image_folder
from tftransfer.heads import build_classifier
from tftransfer.run import schedule_of, train_run
from tftransfer.settings import TrainConfig
from tftransfer.train import compile_classifier, warm_adam

GRID = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
AUTO = {"learning_rate": "auto", "fine_tune_learning_rate": "auto"}


def best_rate(results: dict) -> float:
    """The rate of `{rate: (accuracy, loss)}` with the highest accuracy."""
    return max(results, key=lambda rate: results[rate][0])


def tie_rate(results: dict) -> float:
    """Among rates within 0.005 of the highest accuracy, the lowest loss."""
    top = max(accuracy for accuracy, _ in results.values())
    near = {rate: loss for rate, (accuracy, loss) in results.items()
            if accuracy >= top - 0.005}
    return min(near, key=near.get)


def tied_rates(results: dict, examples: int) -> list:
    """Rates whose accuracy is within one binomial standard error of the
    highest, `sqrt(p (1 - p) / examples)` on `examples` validation images:
    the validation sample cannot tell them from the best."""
    top = max(accuracy for accuracy, _ in results.values())
    error = math.sqrt(top * (1 - top) / examples)
    return [rate for rate, (accuracy, _) in results.items() if accuracy >= top - error]


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
    network.set_weights(start)
    print("  " + ", ".join(f"{rate:g}: {accuracy:.3f}"
                           for rate, (accuracy, _) in results.items()), flush=True)
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


def seed_round(args, seed: int, cache_dir: str) -> dict:
    """Both phases' grids and the engine's suggestions for one seed."""
    config = run_config(args, cache_dir=cache_dir, seed=seed, **AUTO)
    keras.utils.set_random_seed(seed)
    backbone = load_backbone(config.network, config.weights, None, config.alpha)
    size = int(backbone.input_shape[1])
    folder = scan_image_folder(config.data_dir, config.validation_split, seed)
    model = build_classifier(backbone, len(folder.class_names), config.dropout)
    engine = Engine(model, FolderExamples(folder, size, config.batch_size, seed),
                    schedule_of(config))

    head, train, validation = engine.head_data()
    print(f"seed {seed}, head grid:", flush=True)
    head_grid = grid(head, train, validation, head.get_weights(), args.epochs)
    engine.find_rate("head", head, train)
    compile_classifier(head, engine.rate("head"), False)
    head.fit(train, validation_data=validation, epochs=args.epochs, verbose=0)

    network, train, validation = engine.fine_tune_data()
    print(f"seed {seed}, fine-tune grid:", flush=True)
    momentum = engine.ema("fine_tune", train)
    warmup = round(engine.schedule.fine_tune_warmup * engine.steps_per_epoch(train))
    fine_tune_grid = grid(network, train, validation, network.get_weights(),
                          args.fine_tune_epochs,
                          optimizer=lambda rate: warm_adam(rate, warmup, momentum))
    # As `Engine.fit` runs it: through the phase's compiled `fit`.
    optimizer = engine.optimizer("fine_tune", train)
    compile_classifier(network, optimizer=optimizer)
    engine.find_rate("fine_tune", network, train,
                     schedule=optimizer._learning_rate)  # Keras' schedule
    found = {phase: engine.found[phase]["suggested_learning_rate"]
             for phase in ("head", "fine_tune")}
    print(f"seed {seed}: suggested {found['head']:.3g} (head), "
          f"{found['fine_tune']:.3g} (fine-tune)", flush=True)
    examples = engine.examples.totals["validation"]
    return {"head": {"grid": head_grid, "suggested": found["head"],
                     "examples": examples},
            "fine_tune": {"grid": fine_tune_grid, "suggested": found["fine_tune"],
                          "examples": examples}}


def mean_grid(grids: list) -> dict:
    return {rate: (statistics.fmean(g[rate][0] for g in grids),
                   statistics.fmean(g[rate][1] for g in grids)) for rate in GRID}


def judge(phase: str, rounds: list) -> dict:
    """Prints and returns `phase`'s suggestion against the mean grid's best."""
    grids = [r[phase]["grid"] for r in rounds]
    suggested = [r[phase]["suggested"] for r in rounds]
    mean = mean_grid(grids)
    best, tied = best_rate(mean), tie_rate(mean)
    examples = rounds[0][phase]["examples"]
    plateau = tied_rates(mean, examples)
    geometric = math.exp(statistics.fmean(math.log(s) for s in suggested))
    ratio = geometric / best
    print(f"{phase}: mean grid " + ", ".join(
        f"{rate:g}: {accuracy:.3f}" for rate, (accuracy, _) in mean.items()))
    print(f"{phase}: suggested {geometric:.3g} (seeds: "
          + ", ".join(f"{s:.3g}" for s in suggested)
          + f"), best {best:g} (mean val_accuracy {mean[best][0]:.4f}), ratio "
          f"{ratio:.2f} ({'within' if 1 / 3 <= ratio <= 3 else 'NOT within'} 3x); "
          "per seed " + ", ".join(f"{s / best:.2f}" for s in suggested)
          + f"; by the tie rule best {tied:g}, ratio {geometric / tied:.2f}; "
          f"within one standard error of the best ({examples} "
          f"validation images): {', '.join(f'{rate:g}' for rate in plateau)}",
          flush=True)
    return {"mean_grid": {str(rate): value for rate, value in mean.items()},
            "suggested": suggested, "geometric_mean": geometric, "best": best,
            "ratio": ratio, "tie_rule_best": tied, "within_error": plateau}


def run_pair(args, seed: int, auto_first: bool) -> dict:
    """A fixed-rate and an auto run (empty caches), in the order given."""
    summaries = {}
    for name in (("auto", "fixed") if auto_first else ("fixed", "auto")):
        with tempfile.TemporaryDirectory() as output:
            summaries[name] = train_run(run_config(
                args, output=output + "/run", cache_dir=output + "/cache",
                seed=seed, **(AUTO if name == "auto" else {}))).summary
    auto, fixed = (summaries[name]["timings"] for name in ("auto", "fixed"))
    cost = (sum(auto.get(stage, 0.0) for stage in ("lr_find", "head", "fine_tune"))
            - sum(fixed.get(stage, 0.0) for stage in ("head", "fine_tune")))
    result = {"cost": cost, "lr_find": auto.get("lr_find", 0.0),
              **{f"{name}_seconds": summaries[name]["seconds"] for name in summaries},
              **{f"{name}_report": summaries[name]["report_seconds"]
                 for name in summaries},
              "images": summaries["fixed"]["num_train"]
              + summaries["fixed"]["num_validation"]}
    print(f"round {seed}: fixed {result['fixed_seconds']:.1f} s, auto "
          f"{result['auto_seconds']:.1f} s (lr_find stage {result['lr_find']:.2f} s); "
          f"finder's cost {cost:.2f} s = {cost / result['fixed_seconds']:.1%}",
          flush=True)
    return result


def main():
    parser = run_parser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cost-only", action="store_true")
    args = parser.parse_args()
    report = {}
    if not args.cost_only:
        with tempfile.TemporaryDirectory() as cache_dir:
            rounds = [seed_round(args, seed, cache_dir) for seed in args.seeds]
        report = {phase: judge(phase, rounds) for phase in ("head", "fine_tune")}
    pairs = [run_pair(args, seed, auto_first=seed % 2 == 1)
             for seed in range(args.rounds)]
    share = statistics.median(p["cost"] / p["fixed_seconds"] for p in pairs)
    report_share = statistics.median(p["fixed_report"] / p["fixed_seconds"]
                                     for p in pairs)
    print(f"finder's cost: median {share:.1%} of a fixed-rate run "
          f"(median run {statistics.median(p['fixed_seconds'] for p in pairs):.1f} s); "
          f"report: median {report_share:.1%} of the run "
          f"({pairs[0]['images']} images)", flush=True)
    print(json.dumps({**report, "pairs": pairs}))


if __name__ == "__main__":
    main()

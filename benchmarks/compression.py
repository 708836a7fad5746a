"""Cutting and pruning against the full network (issue 15).

For each image folder, laid out with held-out test images no run or choice
sees (a folder's `val/` or `validation/` beside `train/`, else a fifth of each
class by file-name hash; see `fusion.held_out_layout`):

1. Probe tables: `tftransfer probe` for MobileNet 0.75 and MobileNetV2 0.35
   (ImageNet, 224 px), cold cache. Its cost (the probe's own `seconds`: the
   pass with every cut's output, the linear heads, the latencies; not
   start-up and scan) against one forward pass of the full backbone over the
   same images (`train --epochs 1`'s `features` stage, cold cache),
   alternated, median of `--rounds` on the folders named by `--cost-on`
   (target <= 1.3x).
2. `--cut auto` against the full backbone, head only (`--epochs`), both read
   from the probe's cache: validation and test accuracy, cut, parameters.
3. With `--prune-on` folders: MobileNet 0.75 fine-tuned (top 30%) with and
   without `--prune 0.8` (target: accuracy within 0.02, gzip of the pruned
   kernels <= 0.35x their dense size), and with `--prune-filters 0.5`
   (target: latency lower, accuracy within 0.03), the classifiers' latency
   (batch 1) measured alternately in this process, median of 5. `--seeds`
   repeats these three runs per seed; `--prune-only` skips 1 and 2.

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/compression.py \
      ../shared/data/hymenoptera ../shared/data/flowers128 ../shared/data/cats_and_dogs \
      --cost-on flowers128 cats_and_dogs --prune-on hymenoptera cats_and_dogs
  KERAS_HOME=... python benchmarks/compression.py ../shared/data/hymenoptera \
      ../shared/data/cats_and_dogs --prune-only --seeds 0 1 2
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from frozen_phase import timed  # noqa: E402  (sibling scripts)
from fusion import held_out_layout  # noqa: E402

BACKBONES = {"mobilenet 0.75": "mobilenet:alpha=0.75",
             "mobilenet_v2 0.35": "mobilenet_v2:alpha=0.35"}
TFTRANSFER = [sys.executable, "-m", "tftransfer"]
# Fine-tuning schedules of the pruning runs: (head epochs, fine-tuning epochs).
SCHEDULES = {"hymenoptera": (5, 5), "cats_and_dogs": (3, 2)}


def probe(data, backbone, cache, table):
    return timed([*TFTRANSFER, "probe", data, "--backbone", backbone, "--cache-dir",
                  cache, "--table", table, "--json"])


def forward_seconds(data, backbone, cache, output):
    """One forward pass of the full backbone over the images: the `features`
    stage of a one-epoch head run with a cold cache."""
    _, out = timed([*TFTRANSFER, "train", data, "--backbone", backbone, "--epochs",
                    "1", "--no-report", "--overwrite", "--cache-dir", cache,
                    "--output", output, "--json"])
    return out["timings"]["features"]


def train(data, backbone, cache, output, *options):
    seconds, out = timed([*TFTRANSFER, "train", data, "--backbone", backbone,
                          "--no-report", "--overwrite", "--cache-dir", cache,
                          "--output", output, "--json", *options])
    return seconds, out


def test_accuracy(run, data):
    return timed([*TFTRANSFER, "evaluate", run, os.path.join(data, "test"),
                  "--json"])[1]["accuracy"]


def probes_and_cuts(name, data, tmp, epochs, rounds, cost_only=False):
    result = {}
    for label, backbone in BACKBONES.items():
        cache = os.path.join(tmp, f"cache-{label}")
        table = os.path.join(tmp, f"probe-{label}.csv")
        _, record = probe(data, backbone, cache, table)
        costs = []
        for index in range(rounds):
            probed = record
            if index:  # Round 0's probe filled `cache`; later rounds start cold.
                _, probed = probe(data, backbone, os.path.join(
                    tmp, f"cold-{label}-{index}"), table + ".again")
            forward = forward_seconds(data, backbone, os.path.join(
                tmp, f"forward-{label}-{index}"), os.path.join(tmp, "forward-run"))
            # Both after start-up, build and scan: the probe's pass, heads and
            # latencies against the run's forward pass (its `features` stage).
            costs.append({"probe_seconds": probed["seconds"],
                          "forward_seconds": forward,
                          "ratio": round(probed["seconds"] / forward, 2)})
            print(f"  {name} {label} probe cost: {json.dumps(costs[-1])}", flush=True)
        runs = {}
        for kind, options in (() if cost_only else
                              (("full", []), ("cut auto", ["--cut", "auto"]))):
            run = os.path.join(tmp, f"{label}-{kind}".replace(" ", "-"))
            seconds, out = train(data, backbone, cache, run, "--epochs", str(epochs),
                                 *options)
            runs[kind] = {"val": out["val_accuracy"], "test": test_accuracy(run, data),
                          "cut": (out.get("cut") or {}).get("layer"),
                          "features_computed": out["features"]["computed"],
                          "seconds": round(seconds, 1)}
            print(f"  {name} {label} {kind}: {json.dumps(runs[kind])}", flush=True)
        result[label] = {"cuts": record["cuts"], "auto": record["cut"],
                         "best": record["best"], "costs": costs, "runs": runs}
    return result


def pruning(name, data, tmp, cache, seed=0):
    from tftransfer.probe import measure_latency  # Imports TensorFlow: late.

    head, fine = SCHEDULES.get(name, (3, 2))
    backbone = BACKBONES["mobilenet 0.75"]
    schedule = ["--epochs", str(head), "--fine-tune-epochs", str(fine), "--seed",
                str(seed)]
    runs = {}
    for kind, options in (("unpruned", []), ("prune 0.8", ["--prune", "0.8"]),
                          ("prune filters 0.5", ["--prune-filters", "0.5"])):
        run = os.path.join(tmp, kind.replace(" ", "-"))
        seconds, out = train(data, backbone, cache, run, *schedule, *options)
        row = {"val": out["val_accuracy"], "test": test_accuracy(run, data),
               "seconds": round(seconds, 1), "run": run}
        if out.get("pruning"):
            p = out["pruning"]
            row.update(sparsity=p["total"]["sparsity"],
                       gzip_ratio=round(p["pruned_kernels_gzip_bytes"]
                                        / p["dense_kernels_gzip_bytes"], 3),
                       saved_model_gzip_mb=round(p["saved_model_gzip_bytes"] / 2**20, 2),
                       tflite_gzip_mb=round(p["tflite_gzip_bytes"] / 2**20, 2))
        if out.get("filter_pruning"):
            f = out["filter_pruning"]
            row.update(params_before=f["params_before"], params_after=f["params_after"])
        runs[kind] = row
        print(f"  {name} {kind}: {json.dumps(row)}", flush=True)
    import keras

    import tftransfer  # noqa: F401  (registers the layers model.keras holds)

    models = {kind: keras.saving.load_model(os.path.join(runs[kind]["run"],
                                                         "model.keras"))
              for kind in ("unpruned", "prune filters 0.5")}
    latency = {kind: [] for kind in models}
    for _ in range(5):
        for kind, model in models.items():
            latency[kind].append(measure_latency(model, repeats=20))
    for kind in models:
        runs[kind]["latency_ms"] = round(statistics.median(latency[kind]), 2)
    runs["prune filters 0.5"]["latency_ratio"] = round(
        runs["prune filters 0.5"]["latency_ms"] / runs["unpruned"]["latency_ms"], 3)
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dirs", nargs="+")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cost-on", nargs="*", default=["flowers128", "cats_and_dogs"])
    parser.add_argument("--prune-on", nargs="*", default=["hymenoptera", "cats_and_dogs"])
    parser.add_argument("--cost-only", action="store_true",
                        help="the probe tables and costs alone (no runs)")
    parser.add_argument("--prune-only", action="store_true",
                        help="the pruning runs alone (no probes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of the pruning runs (each a round of three)")
    args = parser.parse_args()
    results = {}
    for data_dir in args.data_dirs:
        name = os.path.basename(os.path.normpath(data_dir))
        print(f"{name}:", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            data = held_out_layout(data_dir, os.path.join(tmp, "data"))
            rounds = args.rounds if name in args.cost_on else 1
            results[name] = {"probes": {} if args.prune_only else probes_and_cuts(
                name, data, tmp, args.epochs, rounds, args.cost_only)}
            if name in args.prune_on and not args.cost_only:
                for seed in args.seeds:
                    key = "pruning" if seed == args.seeds[0] else f"pruning seed {seed}"
                    results[name][key] = pruning(
                        name, data, tmp, os.path.join(tmp, "cache-mobilenet 0.75"), seed)
            # Before the folder's removal, which takes minutes for the caches.
            print(json.dumps({name: results[name]}), flush=True)
    for name, result in results.items():
        print(f"\n{name}")
        for label, probed in result["probes"].items():
            ratios = [cost["ratio"] for cost in probed["costs"]]
            print(f"  {label}: probe {statistics.median(ratios):.2f}x a forward pass "
                  f"({', '.join(map(str, ratios))}; target <= 1.3); cut auto "
                  f"{probed['auto']} (best {probed['best']})")
            for kind, row in probed["runs"].items():
                print(f"    {kind:9s} val {row['val']:.4f} test {row['test']:.4f}")
        for key in (key for key in result if key.startswith("pruning")):
            print(f"  {key}")
            for kind, row in result[key].items():
                print(f"  {kind:18s} val {row['val']:.4f} test {row['test']:.4f} "
                      f"{json.dumps({k: v for k, v in row.items() if k not in ('val', 'test', 'run')})}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

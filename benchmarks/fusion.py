"""Feature fusion and ensembles of two backbones against each backbone alone.

For each image folder: MobileNet 0.75 and MobileNetV2 0.35 (ImageNet weights,
224 px, head only) trained alone with a cold cache, then their feature fusion
(`--backbone mobilenet:alpha=0.75,mobilenet_v2:alpha=0.35`, which finds every
member's features in the cache the single runs filled) and their ensemble
(`tftransfer ensemble`). Every model is scored on held-out test images that
no run saw: a folder's `val/` or `validation/` when it has `train/` beside it,
else a fifth of each class (by file name hash), laid out with links.

Wall time: the fusion run after the single runs against a warm rerun of each
single run, alternated, median of `--rounds` (target <= 1.2x).

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/fusion.py \
      ../shared/data/hymenoptera ../shared/data/flowers128 ../shared/data/cats_and_dogs
"""

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from frozen_phase import timed  # noqa: E402  (a sibling script)

MEMBERS = {"mobilenet 0.75": "mobilenet:alpha=0.75",
           "mobilenet_v2 0.35": "mobilenet_v2:alpha=0.35"}
TFTRANSFER = [sys.executable, "-m", "tftransfer"]


def held_out_layout(data_dir: str, into: str) -> str:
    """`into/train` and `into/test` as links: the folder's own held-out split,
    or a fifth of each class's files chosen by the hash of their names."""
    os.makedirs(into)
    held_out = next((os.path.join(data_dir, name) for name in ("val", "validation")
                     if os.path.isdir(os.path.join(data_dir, name))), None)
    if held_out and os.path.isdir(os.path.join(data_dir, "train")):
        os.symlink(os.path.abspath(os.path.join(data_dir, "train")),
                   os.path.join(into, "train"))
        os.symlink(os.path.abspath(held_out), os.path.join(into, "test"))
        return into
    for name in sorted(os.listdir(data_dir)):
        source = os.path.join(data_dir, name)
        if not os.path.isdir(source):
            continue
        for split in ("train", "test"):
            os.makedirs(os.path.join(into, split, name))
        for file in sorted(os.listdir(source)):
            bucket = int(hashlib.sha256(file.encode()).hexdigest(), 16) % 5
            os.symlink(os.path.abspath(os.path.join(source, file)),
                       os.path.join(into, "test" if bucket == 0 else "train", name, file))
    return into


def benchmark(data_dir: str, tmp: str, epochs: int, rounds: int) -> dict:
    data = held_out_layout(data_dir, os.path.join(tmp, "data"))
    cache = os.path.join(tmp, "cache")

    def train(name, backbone, output):
        return timed([*TFTRANSFER, "train", data, "--output", output, "--backbone",
                      backbone, "--epochs", str(epochs), "--no-report", "--overwrite",
                      "--cache-dir", cache, "--json"])

    def test_accuracy(model):
        return timed([*TFTRANSFER, "evaluate", model, os.path.join(data, "test"),
                      "--json"])[1]["accuracy"]

    rows, runs = {}, {}
    for name, backbone in MEMBERS.items():
        runs[name] = os.path.join(tmp, name.replace(" ", "-"))
        seconds, out = train(name, backbone, runs[name])
        rows[name] = {"val": out["val_accuracy"], "test": test_accuracy(runs[name]),
                      "seconds": seconds, "features_computed": out["features"]["computed"]}
        print(f"  {name} (cold): {json.dumps(rows[name])}", flush=True)
    fused = os.path.join(tmp, "fusion")
    seconds, out = train("fusion", ",".join(MEMBERS.values()), fused)
    rows["fusion"] = {"val": out["val_accuracy"], "test": test_accuracy(fused),
                      "seconds": seconds, "features_computed": out["features"]["computed"]}
    print(f"  fusion: {json.dumps(rows['fusion'])}", flush=True)
    ensemble = os.path.join(tmp, "ensemble")
    seconds, out = timed([*TFTRANSFER, "ensemble", *runs.values(), "--output", ensemble,
                          "--json"])
    rows["ensemble"] = {"val": out["val_accuracy"], "test": test_accuracy(ensemble),
                        "seconds": seconds}
    print(f"  ensemble: {json.dumps(rows['ensemble'])}", flush=True)
    # Each member's warm single run against the fusion (all from the cache),
    # alternated.
    warm, fusion = {name: [] for name in MEMBERS}, []
    for _ in range(rounds):
        for name, backbone in MEMBERS.items():
            warm[name].append(train(name, backbone, runs[name] + "-warm")[0])
            if name == next(iter(MEMBERS)):
                fusion.append(train("fusion", ",".join(MEMBERS.values()),
                                    fused + "-again")[0])
    ratios = {name: [f / w for f, w in zip(fusion, seconds)]
              for name, seconds in warm.items()}
    return {"rows": rows, "warm_single_seconds": warm, "fusion_seconds": fusion,
            "ratio_median": {name: statistics.median(r) for name, r in ratios.items()},
            "ratios": ratios}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dirs", nargs="+")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = {}
    for data_dir in args.data_dirs:
        name = os.path.basename(os.path.normpath(data_dir))
        print(f"{name}:", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = benchmark(data_dir, tmp, args.epochs, args.rounds)
    for name, result in results.items():
        rows = result["rows"]
        singles = [rows[member]["test"] for member in MEMBERS]
        print(f"\n{name}\n{'':18s} {'val':>7s} {'test':>7s} {'seconds':>8s}")
        for row_name, row in rows.items():
            print(f"{row_name:18s} {row['val']:7.4f} {row['test']:7.4f} "
                  f"{row['seconds']:8.1f}")
        print(f"fusion {rows['fusion']['test'] - max(singles):+.4f} and ensemble "
              f"{rows['ensemble']['test'] - max(singles):+.4f} against the better "
              f"single backbone's test accuracy; fusion run "
              + "; ".join(f"{result['ratio_median'][member]:.2f}x a warm {member} run "
                          f"(median of {len(ratios)}: "
                          f"{', '.join(f'{r:.2f}' for r in ratios)})"
                          for member, ratios in result["ratios"].items())
              + "; target <= 1.2")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

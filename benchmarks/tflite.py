"""LiteRT files: float32 / float16 / dynamic / int8, checked against their model.

For each data set and backbone, a head-only tftransfer run (ImageNet weights,
5 epochs on cached features; not timed) gives the Keras model. Each
quantization is then written with `tftransfer.tflite_check.tflite_for_folder`
(int8 calibrated on 200 training images), run in LiteRT's interpreter
(`ai-edge-litert`) on the run's validation split beside the Keras model, and
timed per image at 1 thread and at all threads (median of 30 calls).

The peer is Keras' own `model.export(format="litert")` (float32, Select TF ops
allowed, nothing checked): its conversion time and file size.

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/tflite.py \\
      ../shared/data/hymenoptera ../shared/data/cats_and_dogs
"""

import argparse
import json
import os
import platform
import tempfile
import time

BACKBONES = [("mobilenet", 0.75), ("mobilenet_v2", 0.35)]
MODES = ["none", "float16", "dynamic", "int8"]


def cpu() -> str:
    """The CPU's model name and its int8 dot-product instruction sets."""
    name, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name") and name in ("", "unknown",
                                                              "x86_64"):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    dot = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16"})
    return f"{name}; int8 dot-product: {', '.join(dot) or 'none (AVX2 only)'}"


def measure(data: str, backbone: str, alpha: float, work: str) -> list:
    from tftransfer import TrainConfig, train_run
    from tftransfer.folders import scan_image_folder
    from tftransfer.tflite_check import tflite_for_folder

    run = os.path.join(work, f"{os.path.basename(data)}-{backbone}")
    result = train_run(TrainConfig(data, backbone=backbone, alpha=alpha, epochs=5,
                                   output=run, cache_dir=os.path.join(work, "cache"),
                                   verbose=0))
    model = result.model
    folder = scan_image_folder(data, 0.2, 0, progress=False)
    rows = []
    start = time.perf_counter()
    peer = os.path.join(work, "keras-export.tflite")
    model.export(peer, format="litert", verbose=False)
    rows.append({"mode": "keras export (peer)", "convert_s":
                 time.perf_counter() - start, "size_bytes": os.path.getsize(peer)})
    for mode in MODES:
        start = time.perf_counter()
        report = tflite_for_folder(model, os.path.join(run, f"{mode}.tflite"), folder,
                                   folder.class_names, mode, "validation",
                                   max_accuracy_drop=None, overwrite=True)
        rows.append({"mode": mode, "convert_and_check_s": time.perf_counter() - start,
                     **{k: report[k] for k in (
                         "size_bytes", "keras_accuracy", "tflite_accuracy",
                         "agreement", "max_probability_difference", "latency_ms",
                         "threads", "num_images")}})
    return rows


def table(data: str, backbone: str, alpha: float, rows: list) -> str:
    float32 = next(r for r in rows if r["mode"] == "none")
    lines = [f"### {os.path.basename(data)}, {backbone} alpha {alpha} "
             f"({float32['num_images']} validation images, Keras model accuracy "
             f"{float32['keras_accuracy']:.4f})", "",
             "| file | size | x float32 | accuracy | agreement | max prob. diff | "
             "ms 1 thread | ms all threads | x float32 (1 thread) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row["size_bytes"] / float32["size_bytes"]
        if "latency_ms" not in row:
            lines.append(f"| {row['mode']} | {row['size_bytes'] / 1e6:.2f} MB | "
                         f"{ratio:.2f} | | | | | | |")
            continue
        latency = row["latency_ms"]
        lines.append(
            f"| {row['mode']} | {row['size_bytes'] / 1e6:.2f} MB | {ratio:.2f} | "
            f"{row['tflite_accuracy']:.4f} | {row['agreement']:.4f} | "
            f"{row['max_probability_difference']:.3f} | {latency['1_thread']:.2f} | "
            f"{latency['all_threads']:.2f} ({row['threads']}) | "
            f"{latency['1_thread'] / float32['latency_ms']['1_thread']:.2f} |")
    peer = rows[0]["convert_s"]
    ours = float32["convert_and_check_s"]
    lines += ["", f"Conversion: Keras' export {peer:.1f} s; tftransfer float32 "
                  f"conversion and parity check {ours:.1f} s."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="+")
    parser.add_argument("--json", help="also write every row here")
    args = parser.parse_args()
    print(f"CPU: {cpu()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="tflite-bench-") as work:
        for data in args.data:
            for backbone, alpha in BACKBONES:
                rows = measure(data, backbone, alpha, work)
                results.append({"data": data, "backbone": backbone, "alpha": alpha,
                                "rows": rows})
                print(table(data, backbone, alpha, rows), "\n", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()

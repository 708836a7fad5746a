"""XLA (`jit_compile`) on or off, per backbone, on this machine: the data behind `--jit auto`.

For each backbone (random weights: speed does not depend on their values) it
times, in one process, with and without XLA:

  forward     the frozen backbone on a batch of pixels, as when features or
              activations are computed (images/s)
  train step  one training step of the whole classifier, the top 30% of the
              backbone unfrozen, as when fine-tuning on images (images/s)

and, once, training a head on precomputed features (`fit` on 1280-wide
features, as in the frozen phase; seconds per epoch).

Rounds alternate XLA off and on, so load from other processes hits both alike;
the median of the rounds is reported, and the first call (tracing and XLA
compilation) separately.

Usage:
  python benchmarks/xla.py [--backbones mobilenet_v2 resnet50 ...] [--rounds 3]
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tftransfer.backbones import load_backbone  # noqa: E402
from tftransfer.heads import build_classifier  # noqa: E402
from tftransfer.train import (  # noqa: E402
    compile_classifier,
    default_fine_tune_layers,
    feature_dataset,
    unfreeze_top,
)

DEFAULT_BACKBONES = ["mobilenet_v2", "mobilenet", "efficientnet_b0", "resnet50",
                     "vgg16", "densenet121"]


def timed(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def compare(make_call, rounds):
    """{mode: (first call s, median s of later calls)} for jit off and on."""
    calls = {jit: make_call(jit) for jit in (False, True)}
    first = {jit: timed(calls[jit]) for jit in (False, True)}
    times = {False: [], True: []}
    for _ in range(rounds):
        for jit in (False, True):
            times[jit].append(timed(calls[jit]))
    return {jit: (first[jit], statistics.median(times[jit])) for jit in (False, True)}


def forward_call(backbone, pixels):
    def make(jit):
        function = tf.function(lambda x: backbone(x, training=False), jit_compile=jit)
        return lambda: function(pixels).numpy()
    return make


def train_call(name, image_size, pixels, labels):
    def make(jit):
        keras.utils.set_random_seed(0)
        backbone = load_backbone(name, None, image_size)
        model = build_classifier(backbone, 5)
        unfreeze_top(backbone, default_fine_tune_layers(backbone))
        compile_classifier(model, 1e-4)
        model.jit_compile = jit
        return lambda: model.train_on_batch(pixels, labels)
    return make


def head_call(features, labels):
    def make(jit):
        head = keras.Sequential([keras.Input(features.shape[1:]),
                                 keras.layers.Dropout(0.2), keras.layers.Dense(5)])
        compile_classifier(head, 1e-2)
        head.jit_compile = jit
        dataset = feature_dataset(features, labels, 32, shuffle=True)
        return lambda: head.fit(dataset, epochs=1, verbose=0)
    return make


def line(what, unit_images, result):
    (f0, t0), (f1, t1) = result[False], result[True]
    if unit_images:
        speed0, speed1 = unit_images / t0, unit_images / t1
        text = f"{speed0:7.1f} -> {speed1:7.1f} images/s"
    else:
        speed0, speed1 = 1 / t0, 1 / t1
        text = f"{t0:7.3f} -> {t1:7.3f} s"
    ratio = speed1 / speed0
    print(f"{what:<36} {text}  XLA x{ratio:.2f}  (first call {f0:.1f} s / "
          f"{f1:.1f} s)", flush=True)
    return {"off": 1 / speed0, "on": 1 / speed1, "xla_speedup": round(ratio, 3),
            "first_call_off": round(f0, 2), "first_call_on": round(f1, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"{os.cpu_count()} CPUs, GPUs: {tf.config.list_physical_devices('GPU')}")
    rng = np.random.default_rng(0)
    size = args.image_size
    pixels = tf.constant(rng.uniform(0, 255, (args.batch_size, size, size, 3)),
                         "float32")
    train_pixels = pixels[: args.train_batch_size]
    labels = rng.integers(0, 5, args.train_batch_size)
    results = {}
    for name in args.backbones:
        backbone = load_backbone(name, None, size)
        results[name] = {
            "forward": line(f"{name} forward, batch {args.batch_size}",
                            args.batch_size,
                            compare(forward_call(backbone, pixels), args.rounds)),
            "train_step": line(f"{name} train step, batch {args.train_batch_size}",
                               args.train_batch_size,
                               compare(train_call(name, size, train_pixels, labels),
                                       args.rounds)),
        }
    features = rng.normal(size=(2048, 1280)).astype("float32")
    results["head_on_features"] = line(
        "head fit on 2048 features, one epoch", 0,
        compare(head_call(features, rng.integers(0, 5, 2048)), args.rounds))
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""Two-phase fine-tuning: tftransfer against the plain Keras recipe, in one run.

Each contender runs as its own process, timed whole (imports, model build,
training, evaluation and, for tftransfer, export and report included), with its
peak memory (max RSS, from `os.wait4`). The contenders alternate within each
round, and the table gives each one's median over the rounds:

  recipe   the Keras guide's two phases: image_dataset_from_directory, frozen
           base called with training=False, a dropout and dense head; then the
           same top layers tftransfer unfreezes (BatchNormalization kept
           frozen), recompiled at the lower rate, fit on. Same rates, epochs,
           head, dropout and batch size as tftransfer's defaults.
  cold     `tftransfer train --fine-tune-epochs` with an empty feature cache
  warm     the same command again (--overwrite), the cache now full
  limit    one bare forward pass of the backbone over every image (once)

With --scaled-copy N, a copy of the folder where every image appears N times
(each copy with distinct bytes, so none is deduplicated) is written to a
temporary folder and `tftransfer train` runs cold on it once: its peak memory
against the cold run's on the folder says whether memory grows with the data.

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/fine_tune.py \
      ../shared/data/cats_and_dogs --epochs 3 --fine-tune-epochs 2 --rounds 3
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from frozen_phase import LIMIT, timed  # noqa: E402  (a sibling script)

RECIPE = r"""
import json, os, sys, keras, tensorflow as tf
(data, size, epochs, fine_tune_epochs, alpha, layers, rate, fine_rate,
 dropout) = sys.argv[1:]
size, epochs, fine_tune_epochs, layers = int(size), int(epochs), int(fine_tune_epochs), int(layers)
options = dict(image_size=(size, size), batch_size=32, seed=0)
if os.path.isdir(os.path.join(data, "train")):
    val = next(os.path.join(data, name) for name in ("val", "validation")
               if os.path.isdir(os.path.join(data, name)))
    train = keras.utils.image_dataset_from_directory(os.path.join(data, "train"), **options)
    val = keras.utils.image_dataset_from_directory(val, shuffle=False, **options)
else:
    train, val = keras.utils.image_dataset_from_directory(
        data, validation_split=0.2, subset="both", **options)
classes = len(train.class_names)
train, val = train.prefetch(tf.data.AUTOTUNE), val.prefetch(tf.data.AUTOTUNE)
base = keras.applications.MobileNet(include_top=False, weights="imagenet",
                                    alpha=float(alpha), input_shape=(size, size, 3),
                                    pooling="avg")
base.trainable = False
inputs = keras.Input((size, size, 3))
x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # MobileNet's preprocess_input
x = base(x, training=False)
x = keras.layers.Dropout(float(dropout))(x)
model = keras.Model(inputs, keras.layers.Dense(classes)(x))
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
model.compile(keras.optimizers.Adam(float(rate)), loss, metrics=["accuracy"])
history = model.fit(train, validation_data=val, epochs=epochs, verbose=2)
head = history.history["val_accuracy"]
base.trainable = True
for layer in base.layers[:-layers]:
    layer.trainable = False
for layer in base.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
        layer.trainable = False
model.compile(keras.optimizers.Adam(float(fine_rate)), loss, metrics=["accuracy"])
history = model.fit(train, validation_data=val, epochs=epochs + fine_tune_epochs,
                    initial_epoch=epochs, verbose=2)
print(json.dumps({"val_accuracy": history.history["val_accuracy"][-1],
                  "val_accuracy_per_epoch": head + history.history["val_accuracy"]}))
"""


def scaled_copy(source: str, target: str, times: int) -> None:
    """Copies an image folder with every image `times` times, bytes distinct.

    JPEG and PNG decoders ignore bytes after the image's end, so each copy
    gets a different trailer: the scan sees distinct content (nothing is
    deduplicated) and the pixels are unchanged.
    """
    for root, _, names in os.walk(source):
        relative = os.path.relpath(root, source)
        os.makedirs(os.path.join(target, relative), exist_ok=True)
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                contents = handle.read()
            stem, extension = os.path.splitext(name)
            for copy in range(times):
                path = os.path.join(target, relative, f"{stem}-{copy}{extension}")
                with open(path, "wb") as handle:
                    handle.write(contents + b"\0" * (copy + 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fine-tune-epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--alpha", type=float, default=0.75)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scaled-copy", type=int, default=0, metavar="N",
                        help="also run cold on a copy with every image N times")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more options for `tftransfer train`")
    args = parser.parse_args()
    from tftransfer.graph import count_network_layers
    from tftransfer.settings import FINE_TUNE_LEARNING_RATE, HEAD_LEARNING_RATE

    layers = max(1, round(0.3 * count_network_layers("mobilenet", args.alpha)))
    size, alpha = str(args.image_size), str(args.alpha)
    recipe = [sys.executable, "-c", RECIPE, args.data_dir, size, str(args.epochs),
              str(args.fine_tune_epochs), alpha, str(layers), str(HEAD_LEARNING_RATE),
              str(FINE_TUNE_LEARNING_RATE), "0.2"]
    rows = {"recipe": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as tmp:
        def train(data_dir, cache, extra=()):
            return [sys.executable, "-m", "tftransfer", "train", data_dir,
                    "--output", os.path.join(tmp, "run"), "--overwrite",
                    "--backbone", "mobilenet", "--alpha", alpha, "--image-size", size,
                    "--epochs", str(args.epochs),
                    "--fine-tune-epochs", str(args.fine_tune_epochs),
                    "--cache-dir", cache, "--json", *args.extra, *extra]

        def tftransfer_row(seconds, out):
            history = out["history"]
            return {"seconds": seconds, "val_accuracy": out["val_accuracy"],
                    "peak_rss_mib": out["peak_rss_mib"],
                    "val_accuracy_per_epoch": history["val_accuracy"],
                    "timings": out.get("timings"),
                    "computed": (out["features"] or {}).get("computed")}

        for round_ in range(args.rounds):
            cache = os.path.join(tmp, f"cache-{round_}")
            seconds, out = timed(recipe)
            rows["recipe"].append({"seconds": seconds, **out})
            rows["cold"].append(tftransfer_row(*timed(train(args.data_dir, cache))))
            rows["warm"].append(tftransfer_row(*timed(train(args.data_dir, cache))))
            shutil.rmtree(cache)
            print(f"round {round_ + 1}: " + json.dumps(
                {name: {k: v for k, v in runs[-1].items()
                        if k in ("seconds", "val_accuracy", "peak_rss_mib")}
                 for name, runs in rows.items()}), flush=True)
        seconds, out = timed([sys.executable, "-c", LIMIT, args.data_dir, size, alpha])
        limit = {"seconds": seconds, **out}
        scaled = None
        if args.scaled_copy:
            copy = os.path.join(tmp, "scaled")
            scaled_copy(args.data_dir, copy, args.scaled_copy)
            scaled = tftransfer_row(*timed(train(copy, os.path.join(tmp, "cache-x"))))
    median = {name: {key: statistics.median(run[key] for run in runs)
                     for key in ("seconds", "val_accuracy", "peak_rss_mib")}
              for name, runs in rows.items()}
    print(f"\n{'':8s} {'wall s':>8s} {'val_acc':>8s} {'RSS MiB':>8s}   "
          f"(medians of {args.rounds})")
    for name, row in median.items():
        print(f"{name:8s} {row['seconds']:8.1f} {row['val_accuracy']:8.4f} "
              f"{row['peak_rss_mib']:8.0f}")
    base = median["recipe"]
    for name in ("cold", "warm"):
        row = median[name]
        print(f"{name}: {base['seconds'] / row['seconds']:.2f}x faster than the "
              f"recipe (target 2.5x), accuracy {row['val_accuracy'] - base['val_accuracy']:+.4f}"
              f" (target within 0.01), memory {row['peak_rss_mib'] / base['peak_rss_mib']:.2f}x"
              f" the recipe's (target at most 1.3x); {row['seconds'] / limit['seconds']:.2f}x"
              " the bare-forward process")
    print(f"limit: {limit['seconds']:.1f} s whole, the pass alone "
          f"{limit['forward_seconds']:.1f} s")
    for run in rows["cold"][:1]:
        epochs = run["val_accuracy_per_epoch"]
        print(f"cold, validation accuracy per epoch: {[round(a, 4) for a in epochs]}; "
              f"first fine-tuning epoch {epochs[args.epochs] - epochs[args.epochs - 1]:+.4f}"
              " against the head's last (target at least -0.02)")
        print(f"cold, timings: {run['timings']}")
    if scaled is not None:
        cold = median["cold"]["peak_rss_mib"]
        print(f"scaled copy x{args.scaled_copy}: peak {scaled['peak_rss_mib']} MiB "
              f"against {cold:.0f} MiB ({scaled['peak_rss_mib'] / cold - 1:+.1%}, "
              f"target within 15%), {scaled['seconds']:.1f} s, "
              f"val {scaled['val_accuracy']:.4f}")
    print(json.dumps({"runs": rows, "median": median, "limit": limit,
                      "scaled": scaled}))


if __name__ == "__main__":
    main()

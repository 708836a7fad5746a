"""Frozen-backbone training: tftransfer against the plain Keras recipe, in one run.

Each contender runs as its own process and is timed whole (imports, model build,
training and, for tftransfer, export included):

  recipe      image_dataset_from_directory, frozen base inside the model, fit
  cold        `tftransfer train` with an empty feature cache: features computed
              once, written to the cache, head trained on them, model exported
  warm        the same command again (--overwrite), the cache now full
  limit       one bare forward pass of the backbone over every image

Peak memory (max RSS) of each process is measured with `os.wait4`.

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/frozen_phase.py \
      ../shared/data/hymenoptera --epochs 10
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

RECIPE = r"""
import json, sys, keras, tensorflow as tf
data, size, epochs, alpha = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
train = keras.utils.image_dataset_from_directory(data + "/train", image_size=(size, size), seed=0)
val_dir = data + ("/val" if tf.io.gfile.exists(data + "/val") else "/validation")
val = keras.utils.image_dataset_from_directory(val_dir, image_size=(size, size), shuffle=False)
base = keras.applications.MobileNet(include_top=False, weights="imagenet", alpha=alpha,
                                    input_shape=(size, size, 3))
base.trainable = False
inputs = keras.Input((size, size, 3))
x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # MobileNet's preprocess_input
x = base(x, training=False)
x = keras.layers.GlobalAveragePooling2D()(x)
x = keras.layers.Dropout(0.2)(x)
outputs = keras.layers.Dense(len(train.class_names))(x)
model = keras.Model(inputs, outputs)
model.compile(keras.optimizers.Adam(1e-3),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"])
history = model.fit(train.prefetch(tf.data.AUTOTUNE), validation_data=val, epochs=epochs, verbose=2)
print(json.dumps({"val_accuracy": history.history["val_accuracy"][-1]}))
"""

LIMIT = r"""
import json, sys, keras, tensorflow as tf
data, size, alpha = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
base = keras.applications.MobileNet(include_top=False, weights="imagenet", alpha=alpha,
                                    input_shape=(size, size, 3), pooling="avg")
ds = keras.utils.image_dataset_from_directory(data, image_size=(size, size), labels=None,
                                              shuffle=False, batch_size=32)
start = __import__("time").perf_counter()
base.predict(ds.map(lambda x: x / 127.5 - 1), verbose=0)
print(json.dumps({"forward_seconds": __import__("time").perf_counter() - start}))
"""


def timed(command):
    """Runs a command; returns (wall seconds, its last JSON line + peak RSS MiB)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{command[:4]} failed:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    if isinstance(result, dict):
        result["peak_rss_mib"] = round(usage.ru_maxrss / 1024)
    return seconds, result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--alpha", type=float, default=0.75)
    parser.add_argument("--no-recipe", action="store_true",
                        help="skip the recipe (it needs train/ and val/ folders)")
    args = parser.parse_args()
    size, alpha = str(args.image_size), str(args.alpha)
    results = {}
    if not args.no_recipe:
        seconds, out = timed([sys.executable, "-c", RECIPE, args.data_dir, size,
                              str(args.epochs), alpha])
        results["recipe"] = {"seconds": seconds, **out}
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "tftransfer", "train", args.data_dir,
                   "--output", os.path.join(tmp, "run"), "--backbone", "mobilenet",
                   "--alpha", alpha, "--image-size", size, "--epochs",
                   str(args.epochs), "--cache-dir", os.path.join(tmp, "cache"),
                   "--json"]
        for name, extra in (("cold", []), ("warm", ["--overwrite"])):
            seconds, out = timed(command + extra)
            results[name] = {"seconds": seconds, "val_accuracy": out["val_accuracy"],
                             "peak_rss_mib": out["peak_rss_mib"],
                             "from_cache": out["features"]["hits"]}
    seconds, out = timed([sys.executable, "-c", LIMIT, args.data_dir, size, alpha])
    results["limit"] = {"seconds": seconds, **out}
    limit = results["limit"]
    recipe = results.get("recipe", {"seconds": float("nan"), "val_accuracy": float("nan")})
    print(f"{'':8s} {'wall s':>8s} {'val_acc':>8s} {'RSS MiB':>8s}")
    for name, row in results.items():
        accuracy = row.get("val_accuracy")
        print(f"{name:8s} {row['seconds']:8.1f} "
              f"{accuracy if accuracy is None else round(accuracy, 4)!s:>8s} "
              f"{row['peak_rss_mib']:8d}")
    for name in ("cold", "warm"):
        row = results[name]
        print(f"{name}: {recipe['seconds'] / row['seconds']:.2f}x faster than the "
              f"recipe; {row['seconds'] / limit['seconds']:.2f}x the bare-forward "
              f"process, {row['seconds'] / limit['forward_seconds']:.2f}x the pass "
              f"alone ({limit['forward_seconds']:.1f} s); accuracy "
              f"{row['val_accuracy'] - recipe['val_accuracy']:+.3f} vs the recipe")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""Distillation: `keras.distillation.Distiller` against `tftransfer distill`, in one run.

Both distil the same teacher (a tftransfer run: MobileNet alpha 0.75, ImageNet
weights, trained first and not timed) into the same student (MobileNetV2 alpha
0.35, ImageNet weights, frozen backbone, dropout and dense head) on the same data
and epochs, with temperature 3 and student loss weight 0.5. Each is one process,
timed whole (imports, model builds, training and, for tftransfer, export):

  peer        keras.distillation.Distiller + LogitsDistillation, fit on
              image_dataset_from_directory (teacher and student run on every
              batch of every epoch)
  tftransfer  `tftransfer distill` with an empty cache (teacher logits and student
              features computed once, the head distilled on them)

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/distillation.py \\
      ../shared/data/hymenoptera --epochs 5
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from frozen_phase import timed  # noqa: E402

PEER = r"""
import json, sys, keras, tensorflow as tf
import tftransfer  # registers the teacher's preprocessing layer for load_model
data, teacher_path, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
teacher = keras.saving.load_model(teacher_path, compile=False)
size = teacher.input_shape[1]
train = keras.utils.image_dataset_from_directory(data + "/train", image_size=(size, size), seed=0)
val_dir = data + ("/val" if tf.io.gfile.exists(data + "/val") else "/validation")
val = keras.utils.image_dataset_from_directory(val_dir, image_size=(size, size), shuffle=False)
base = keras.applications.MobileNetV2(include_top=False, weights="imagenet", alpha=0.35,
                                      input_shape=(size, size, 3), pooling="avg")
base.trainable = False
inputs = keras.Input((size, size, 3))
x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # MobileNetV2's preprocess_input
x = base(x, training=False)
x = keras.layers.Dropout(0.2)(x)
student = keras.Model(inputs, keras.layers.Dense(len(train.class_names))(x))
# A KLDivergence instance: the default "kl_divergence" string resolves to a plain
# function that Keras 3.15 applies to the scaled logits, without softmax or T^2.
distiller = keras.distillation.Distiller(
    teacher, student, keras.distillation.LogitsDistillation(
        temperature=3.0, loss=keras.losses.KLDivergence()),
    student_loss_weight=0.5)
distiller.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
history = distiller.fit(train.prefetch(tf.data.AUTOTUNE), validation_data=val,
                        epochs=epochs, verbose=2)
print(json.dumps({"val_accuracy": history.history["val_accuracy"][-1]}))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = os.path.join(tmp, "teacher")
        _, out = timed([sys.executable, "-m", "tftransfer", "train", args.data_dir,
                        "--output", teacher, "--backbone", "mobilenet", "--alpha",
                        "0.75", "--image-size", "224", "--epochs", "5",
                        "--cache-dir", os.path.join(tmp, "teacher-cache"), "--json"])
        results = {"teacher": {"val_accuracy": out["val_accuracy"]}}
        seconds, out = timed([sys.executable, "-c", PEER, args.data_dir,
                              os.path.join(teacher, "model.keras"), str(args.epochs)])
        results["peer"] = {"seconds": seconds, **out}
        seconds, out = timed([sys.executable, "-m", "tftransfer", "distill",
                              args.data_dir, "--teacher", teacher, "--output",
                              os.path.join(tmp, "student"), "--student",
                              "mobilenet_v2", "--alpha", "0.35", "--epochs",
                              str(args.epochs), "--cache-dir",
                              os.path.join(tmp, "cache"), "--json"])
        results["tftransfer"] = {"seconds": seconds,
                                 "val_accuracy": out["val_accuracy"],
                                 "peak_rss_mib": out["peak_rss_mib"]}
    peer, ours = results["peer"], results["tftransfer"]
    print(f"teacher val_accuracy {results['teacher']['val_accuracy']:.4f}")
    print(f"{'':11s} {'wall s':>8s} {'val_acc':>8s} {'RSS MiB':>8s}")
    for name in ("peer", "tftransfer"):
        row = results[name]
        print(f"{name:11s} {row['seconds']:8.1f} {row['val_accuracy']:8.4f} "
              f"{row['peak_rss_mib']:8d}")
    print(f"tftransfer is {peer['seconds'] / ours['seconds']:.2f}x faster; accuracy "
          f"{ours['val_accuracy'] - peer['val_accuracy']:+.3f} vs the peer")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

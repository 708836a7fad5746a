"""Does a LiteRT file still answer like its model? The parity check, and the gate.

Post-training quantization usually costs 0-2 points of accuracy on
MobileNet-class networks, and some networks collapse (MobileNetV3 in
tensorflow#83754). So no file is put where a user asked for it before it has
been run in LiteRT's interpreter on held-out images and compared with the Keras
model: `export_checked_tflite` refuses a file that loses more than
`max_accuracy_drop`, leaving whatever was at the destination untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tftransfer.data import make_dataset
from tftransfer.errors import DataError, TransferError
from tftransfer.export import check_destination
from tftransfer.files import write_json_atomically
from tftransfer.folders import ImageFolder, scan_image_folder
from tftransfer.heads import inference
from tftransfer.litert import LiteRTModel
from tftransfer.settings import CALIBRATION_IMAGES, MAX_ACCURACY_DROP
from tftransfer.tflite import read_ops, tflite_bytes, write_tflite


class AccuracyDropError(TransferError):
    """A LiteRT file lost more accuracy than allowed; it was not written.

    Attributes:
        report: The parity report of the refused file (see `check_tflite`).
    """

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def check_tflite(
    tflite,
    model: keras.Model,
    dataset: tf.data.Dataset,
    latency_repeats: int = 30,
) -> dict:
    """Compares a LiteRT file with its Keras model on labelled images.

    Both see the same batches; the file runs in LiteRT's interpreter.

    Args:
        tflite: A `.tflite` path or a `LiteRTModel`.
        model: The Keras classifier it was made from (returning logits).
        dataset: `(pixels, labels)` batches, pixels in 0..255 at the model's
            size (e.g. `make_dataset` of a validation split).
        latency_repeats: Timed calls for each latency. Defaults to `30`.

    Returns:
        A dict: `num_images`; `keras_accuracy` and `tflite_accuracy`;
        `accuracy_drop` (the first minus the second); `agreement` (fraction
        of images where both give the same class); `max_probability_difference`;
        `size_bytes`; `latency_ms` (median time of one image, `{"1_thread": ...,
        "all_threads": ...}`) and `threads` (what "all" was); `ops` (the op
        names the file uses); `input_dtype`.

    Raises:
        DataError: if `dataset` holds no image.

    Example:

    >>> import os, tempfile, keras, numpy as np, tensorflow as tf, tftransfer
    >>> model = keras.Sequential([keras.Input((32, 32, 3)),
    ...                           keras.layers.GlobalAveragePooling2D(),
    ...                           keras.layers.Dense(2)])
    >>> path = tftransfer.export_tflite(
    ...     model, os.path.join(tempfile.mkdtemp(), "model.tflite"))
    >>> pixels = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3))
    >>> labels = np.zeros(8, "int32")
    >>> report = tftransfer.check_tflite(
    ...     path, model, tf.data.Dataset.from_tensor_slices((pixels, labels)).batch(4))
    >>> report["num_images"], report["agreement"], report["accuracy_drop"]
    (8, 1.0, 0.0)
    >>> report["ops"]
    ['FULLY_CONNECTED', 'MEAN', 'SOFTMAX']
    """
    lite = tflite if isinstance(tflite, LiteRTModel) else LiteRTModel(tflite)
    forward = inference(model)
    labels, expected, answered = [], [], []
    for pixels, batch_labels in dataset:
        logits = forward(pixels)
        expected.append(tf.nn.softmax(tf.cast(logits, tf.float32)).numpy())
        answered.append(lite.predict(pixels.numpy()))
        labels.append(np.asarray(batch_labels))
    if not labels:
        raise DataError("The parity check needs images: the dataset is empty.")
    labels, expected, answered = (np.concatenate(a) for a in (labels, expected,
                                                               answered))
    first = pixels.numpy()[0]
    keras_accuracy = float(np.mean(expected.argmax(-1) == labels))
    tflite_accuracy = float(np.mean(answered.argmax(-1) == labels))
    return {
        "num_images": int(len(labels)),
        "keras_accuracy": keras_accuracy,
        "tflite_accuracy": tflite_accuracy,
        "accuracy_drop": keras_accuracy - tflite_accuracy,
        "agreement": float(np.mean(expected.argmax(-1) == answered.argmax(-1))),
        "max_probability_difference": float(np.abs(expected - answered).max()),
        "size_bytes": os.path.getsize(lite.path),
        "latency_ms": {
            "1_thread": lite.latency_ms(first, 1, latency_repeats),
            "all_threads": lite.latency_ms(first, lite.num_threads, latency_repeats),
        },
        "threads": lite.num_threads,
        "ops": read_ops(lite.path),
        "input_dtype": np.dtype(lite.input_dtype).name,
    }


def export_checked_tflite(
    model: keras.Model,
    path: str,
    validation_data: tf.data.Dataset,
    quantize: str = "none",
    representative_data=None,
    class_names: Optional[Sequence[str]] = None,
    max_accuracy_drop: Optional[float] = MAX_ACCURACY_DROP,
    overwrite: bool = False,
) -> dict:
    """Writes a LiteRT file only if it keeps the model's accuracy.

    The file is converted (see `export_tflite`), run on `validation_data`
    beside the Keras model (see `check_tflite`), and put at `path` only if it
    loses at most `max_accuracy_drop`. Its report is written beside it as
    `<name>.parity.json`, and `labels.txt` too.

    Args:
        model: A classifier taking pixels in 0..255 and returning logits.
        path: Destination `.tflite` file.
        validation_data: `(pixels, labels)` batches to compare on, held out
            from training and from calibration.
        quantize: `"none"`, `"float16"`, `"dynamic"` or `"int8"`. Defaults to
            `"none"`.
        representative_data: Calibration pixel batches for `"int8"` (see
            `calibration_dataset`). Defaults to `None`.
        class_names: Class names in label order. Defaults to `None`.
        max_accuracy_drop: Largest accuracy the file may lose; `None` accepts
            any. Defaults to `0.02`.
        overwrite: Replace an existing file. Defaults to `False`.

    Returns:
        The parity report (see `check_tflite`) with `quantize`, `path`,
        `max_accuracy_drop` and `accepted` (`True`).

    Raises:
        AccuracyDropError: the file lost more than `max_accuracy_drop`; nothing
            was written, and the error's `report` says by how much.
        RunFolderError: if `path` exists and `overwrite` is `False`.

    Example:

    >>> import os, tempfile, keras, numpy as np, tensorflow as tf, tftransfer
    >>> model = keras.Sequential([keras.Input((32, 32, 3)),
    ...                           keras.layers.GlobalAveragePooling2D(),
    ...                           keras.layers.Dense(2)])
    >>> pixels = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3))
    >>> labels = model.predict(pixels, verbose=0).argmax(-1)
    >>> validation = tf.data.Dataset.from_tensor_slices((pixels, labels)).batch(4)
    >>> report = tftransfer.export_checked_tflite(
    ...     model, os.path.join(tempfile.mkdtemp(), "model.tflite"), validation,
    ...     quantize="float16", class_names=["cat", "dog"])
    >>> report["accepted"], report["keras_accuracy"], report["agreement"]
    (True, 1.0, 1.0)
    >>> sorted(os.listdir(os.path.dirname(report["path"])))
    ['labels.txt', 'model.parity.json', 'model.tflite']
    """
    path = os.path.abspath(os.fspath(path))
    check_destination(path, overwrite)
    contents = tflite_bytes(model, quantize, representative_data, class_names)
    with tempfile.TemporaryDirectory(prefix="tftransfer-tflite-") as folder:
        candidate = os.path.join(folder, os.path.basename(path))
        with open(candidate, "wb") as file:
            file.write(contents)
        report = check_tflite(candidate, model, validation_data)
    report = {"quantize": quantize, "path": path,
              "max_accuracy_drop": max_accuracy_drop, **report}
    if max_accuracy_drop is not None and report["accuracy_drop"] > max_accuracy_drop:
        report["accepted"] = False
        raise AccuracyDropError(
            f"The {quantize} LiteRT file loses {report['accuracy_drop']:.4f} accuracy "
            f"on {report['num_images']} held-out images "
            f"({report['keras_accuracy']:.4f} -> {report['tflite_accuracy']:.4f}), "
            f"more than the {max_accuracy_drop} allowed; {path} was not written "
            "(a file already there is untouched). Try another --quantize (dynamic "
            "or float16 lose less), more --calibration-images, or a larger "
            "--max-accuracy-drop.", report)
    report["accepted"] = True
    write_tflite(path, contents, class_names)
    write_json_atomically(parity_report_path(path), report)
    return report


def parity_report_path(path: str) -> str:
    """Where the parity report of the LiteRT file `path` goes."""
    return os.path.splitext(path)[0] + ".parity.json"


def calibration_files(folder: ImageFolder, num_images: int = CALIBRATION_IMAGES,
                      seed: int = 0) -> list:
    """Training files to calibrate on: as many of each class as can be, shuffled.

    Args:
        folder: A scanned image folder.
        num_images: How many. Defaults to `200`.
        seed: Seed of the draw. Defaults to `0`.

    Returns:
        A list of `ImageFile`, classes taken in turn.

    Raises:
        DataError: if the folder has no training images.
    """
    rng = np.random.default_rng(seed)
    by_class = [[f for f in folder.used("train") if f.label == label]
                for label in range(len(folder.class_names))]
    for files in by_class:
        rng.shuffle(files)
    drawn = []
    for rank in range(max(map(len, by_class), default=0)):
        drawn += [files[rank] for files in by_class if rank < len(files)]
    if not drawn:
        raise DataError(f"{folder.root} has no training images to calibrate int8 "
                        "quantization on.")
    return drawn[:num_images]


def calibration_dataset(folder: ImageFolder, image_size: int,
                        num_images: int = CALIBRATION_IMAGES, seed: int = 0,
                        batch_size: int = 32) -> tf.data.Dataset:
    """Pixel batches of `calibration_files`, decoded and resized as in training.

    Args:
        folder: A scanned image folder.
        image_size: The model's image side.
        num_images: How many images. Defaults to `200`.
        seed: Seed of the draw. Defaults to `0`.
        batch_size: Images per batch. Defaults to `32`.

    Returns:
        A `tf.data.Dataset` of `(pixels, labels)` batches.
    """
    files = calibration_files(folder, num_images, seed)
    return make_dataset([f.path for f in files],
                        np.array([f.label for f in files], "int32"),
                        image_size, batch_size)


def evaluation_split(folder: ImageFolder, preferred: Sequence[str]) -> str:
    """The first of `preferred` splits that holds images (`""`: every image)."""
    for split in preferred:
        if folder.used(split):
            return split
    raise DataError(f"{folder.root} has no {' or '.join(preferred)} images to "
                    "compare the LiteRT file with the model on.")


def tflite_for_folder(model: keras.Model, path: str, folder: ImageFolder,
                      class_names: Sequence[str], quantize: str,
                      split: str, calibration_images: int = CALIBRATION_IMAGES,
                      seed: int = 0, max_accuracy_drop=MAX_ACCURACY_DROP,
                      overwrite: bool = False) -> dict:
    """`export_checked_tflite` on a scanned folder: calibrates on its training
    split, compares on `split`. `folder`'s classes are matched to
    `class_names` by name."""
    image_size = model.input_shape[1]
    files, labels = folder.labelled_for(split, class_names)
    validation = make_dataset([f.path for f in files], labels, image_size)
    calibration = None
    if quantize == "int8":
        calibration = calibration_dataset(folder, image_size, calibration_images,
                                          seed)
    report = export_checked_tflite(model, path, validation, quantize, calibration,
                                   class_names, max_accuracy_drop, overwrite)
    return report


def tflite_from_run(
    model_path: str,
    output: str,
    quantize: str = "none",
    calibration_images: int = CALIBRATION_IMAGES,
    data_dir: Optional[str] = None,
    max_accuracy_drop: Optional[float] = MAX_ACCURACY_DROP,
    overwrite: bool = False,
    safe_mode: bool = True,
) -> dict:
    """`tftransfer export-tflite`: a checked LiteRT file of a run's model.

    Args:
        model_path: A run folder, or a `.keras` file (then `data_dir` is
            required).
        output: Destination `.tflite` file.
        quantize: `"none"`, `"float16"`, `"dynamic"` or `"int8"`. Defaults to
            `"none"`.
        calibration_images: Training images `int8` calibrates on. Defaults to
            `200`.
        data_dir: Image folder to calibrate and compare on. Defaults to the
            run's own (its training split calibrates, its validation split
            compares, split as in training). Given, its `test/` split compares
            if it has one, else its validation split.
        max_accuracy_drop: Largest accuracy the file may lose. Defaults to
            `0.02`.
        overwrite: Replace an existing `output`. Defaults to `False`.
        safe_mode: Keras' safe mode when loading the model. Defaults to `True`.

    Returns:
        The parity report (see `export_checked_tflite`).
    """
    from tftransfer.export import read_labels as read_run_labels
    from tftransfer.run_folder import load_run_model, model_file

    check_destination(os.path.abspath(output), overwrite)
    keras_file = model_file(model_path)
    if keras_file is None:
        raise DataError(f"No model at {model_path!r}: expected a run folder "
                        "(holding model.keras) or a .keras file.")
    settings = {}
    metrics = os.path.join(os.path.dirname(keras_file), "metrics.json")
    if os.path.isdir(model_path) and os.path.isfile(metrics):
        with open(metrics, encoding="utf-8") as file:
            settings = json.load(file).get("settings") or {}
    if data_dir is None and not settings.get("data_dir"):
        raise DataError(f"Which images should {model_path} be calibrated and "
                        "checked on? Pass --data DATA_DIR (a .keras file, or a run "
                        "folder written before its settings were recorded).")
    folder = scan_image_folder(data_dir or settings["data_dir"],
                               settings.get("validation_split", 0.2),
                               settings.get("seed", 0), progress=False)
    model = load_run_model(keras_file, safe_mode=safe_mode)
    class_names = (read_run_labels(os.path.join(os.path.dirname(keras_file),
                                                "labels.txt"))
                   or folder.class_names)
    if len(class_names) != model.output_shape[-1]:
        raise DataError(f"{model_path} has {model.output_shape[-1]} classes but its "
                        f"labels name {len(class_names)}: {class_names}.")
    preferred = ("validation",) if data_dir is None else ("test", "validation")
    return tflite_for_folder(model, output, folder, class_names, quantize,
                             evaluation_split(folder, preferred),
                             calibration_images, settings.get("seed", 0),
                             max_accuracy_drop, overwrite)

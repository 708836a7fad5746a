"""Evaluate and predict through an exported model, as it is deployed.

A SavedModel is called through its `serving_default` signature with raw file
bytes, as a server would call it; a `.tflite` file runs in LiteRT's interpreter
(`LiteRTModel`), as a phone would run it. What is measured is what is deployed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import numpy as np
import tensorflow as tf

from tftransfer.data_report import data_report
from tftransfer.errors import DataError
from tftransfer.export import read_labels
from tftransfer.folders import check_image_file, scan_image_folder, walk_files
from tftransfer.interpretation import Interpretation


def resolve_saved_model(model_path: str) -> str:
    """Returns the SavedModel folder for a run folder or a SavedModel folder."""
    path = os.fspath(model_path)
    for candidate in (os.path.join(path, "saved_model"), path):
        if os.path.isfile(os.path.join(candidate, "saved_model.pb")):
            return candidate
    raise DataError(
        f"No SavedModel at {model_path!r}. Expected a run folder (holding "
        "saved_model/) or a SavedModel folder (holding saved_model.pb)."
    )


def load_served(model_path: str):
    """A `LiteRTModel` for a `.tflite` file, else a `ServedModel`."""
    if os.fspath(model_path).endswith(".tflite"):
        from tftransfer.litert import LiteRTModel

        return LiteRTModel(model_path)
    return ServedModel(model_path)


class ServedModel:
    """A tftransfer SavedModel loaded with TensorFlow alone.

    Predictions go through the SavedModel's `serving_default` signature with
    the files' raw bytes, as a server would call it.

    Args:
        model_path: A run folder (holding `saved_model/`) or a SavedModel folder
            written by `export_saved_model`.

    Attributes:
        path: The SavedModel folder.
        class_names: The class names from its `assets/labels.txt`, in label
            order.

    Raises:
        DataError: if `model_path` holds no SavedModel.
        FileNotFoundError: if the SavedModel has no `assets/labels.txt` (it was
            not written by `export_saved_model`).

    Example:

    >>> import os, tempfile, keras, tftransfer
    >>> from tftransfer.demo import write_demo_images
    >>> folder = tempfile.mkdtemp()
    >>> data_dir = write_demo_images(os.path.join(folder, "data"),
    ...                              images_per_class=4, image_size=32)
    >>> model = keras.Sequential([keras.Input((32, 32, 3)),
    ...                           keras.layers.GlobalAveragePooling2D(),
    ...                           keras.layers.Dense(3)])
    >>> export_dir = tftransfer.export_saved_model(
    ...     model, os.path.join(folder, "saved_model"), ["desert", "forest", "ocean"])
    >>> served = tftransfer.ServedModel(folder)  # The run folder will do.
    >>> served.class_names
    ['desert', 'forest', 'ocean']
    >>> path = os.path.join(data_dir, "ocean", "ocean_000.jpg")
    >>> probabilities = served.predict_files([path, path])
    >>> probabilities.shape, probabilities.dtype
    ((2, 3), dtype('float32'))
    >>> bool(abs(probabilities.sum(axis=-1) - 1).max() < 1e-5)
    True
    """

    def __init__(self, model_path: str):
        self.path = resolve_saved_model(model_path)
        self._loaded = tf.saved_model.load(self.path)
        self._serve = self._loaded.signatures["serving_default"]
        self.class_names = read_labels(os.path.join(self.path, "assets", "labels.txt"))
        if self.class_names is None:
            raise FileNotFoundError(
                f"No assets/labels.txt in {self.path}: it was not written by "
                "export_saved_model. Export the model with tftransfer.")

    def predict_bytes(
        self, contents: Sequence[bytes], batch_size: int = 32
    ) -> np.ndarray:
        """Returns class probabilities of encoded images.

        Args:
            contents: Encoded JPEG, PNG, GIF, BMP or WebP images, as bytes.
            batch_size: Images per call of the signature. Defaults to `32`.

        Returns:
            A float32 array `(len(contents), num_classes)`.
        """
        outputs = []
        for start in range(0, len(contents), batch_size):
            batch = tf.constant(list(contents[start : start + batch_size]), tf.string)
            outputs.append(self._serve(image_bytes=batch)["probabilities"].numpy())
        if not outputs:
            return np.zeros([0, len(self.class_names)], "float32")
        return np.concatenate(outputs)

    def predict_files(self, paths: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Returns class probabilities of image files, as `predict_bytes` does.

        Args:
            paths: Image files.
            batch_size: Images per call of the signature. Defaults to `32`.

        Returns:
            A float32 array `(len(paths), num_classes)`.
        """
        contents = []
        for path in paths:
            with open(path, "rb") as handle:
                contents.append(handle.read())
        return self.predict_bytes(contents, batch_size)


def evaluate_folder(model_path: str, data_dir: str, batch_size: int = 32,
                    report: Optional[str] = None) -> dict:
    """Evaluates an exported SavedModel on an image folder, as it is served.

    Uses `test/` if `data_dir` has split folders (else `val/`/`validation/`), or
    every image when `data_dir` holds class folders directly. Class folders are
    matched to the model's classes by name; the folder may lack some of them.
    Unusable files are skipped and counted.

    Args:
        model_path: A run folder, a SavedModel folder (see `ServedModel`) or
            a `.tflite` file (see `LiteRTModel`).
        data_dir: An image folder, as `scan_image_folder` takes.
        batch_size: Images per call of the model. Defaults to `32`.
        report: A folder to write the HTML report into (`report.html`, with
            the confusion matrix, per-class scores and top losses; see
            `write_report`). Defaults to `None`.

    Returns:
        A dict: `accuracy`, `loss`, `num_images`, `per_class` (each class's
        `precision`, `recall`, `f1` and `support`) and `confusion_matrix`
        (rows are true classes, columns predicted ones, in the model's class
        order), plus `split` (`"test"`, `"validation"` or `"all"`),
        `num_skipped` (unusable files of that split) and `model` (the
        SavedModel folder), `most_confused` and, with `report`, `report`
        (the HTML file).

    Raises:
        DataError: if `model_path` holds no SavedModel, if `data_dir` cannot be
            used (see `scan_image_folder`), or if it has class folders that are
            not classes of the model.

    Example:

    >>> import os, tempfile, keras, tftransfer
    >>> from tftransfer.demo import write_demo_images
    >>> folder = tempfile.mkdtemp()
    >>> data_dir = write_demo_images(os.path.join(folder, "data"),
    ...                              images_per_class=4, image_size=32)
    >>> model = keras.Sequential([keras.Input((32, 32, 3)),
    ...                           keras.layers.GlobalAveragePooling2D(),
    ...                           keras.layers.Dense(3)])
    >>> export_dir = tftransfer.export_saved_model(
    ...     model, os.path.join(folder, "saved_model"), ["desert", "forest", "ocean"])
    >>> result = tftransfer.evaluate_folder(export_dir, data_dir)
    >>> result["split"], result["num_images"], result["num_skipped"]
    ('all', 12, 0)
    >>> sorted(result["per_class"])
    ['desert', 'forest', 'ocean']
    >>> [sum(row) for row in result["confusion_matrix"]]
    [4, 4, 4]
    """
    served = load_served(model_path)
    folder = scan_image_folder(data_dir, validation_split=None)
    split = next(
        s for s in ("test", "validation", "") if any(f.split == s for f in folder.files)
    )
    files, labels = folder.labelled_for(split, served.class_names)
    paths = [f.path for f in files]
    interpretation = Interpretation(served.predict_files(paths, batch_size), labels,
                                    served.class_names, paths)
    result = interpretation.summary()
    result.update(
        split=split or "all",
        num_skipped=sum(1 for f in folder.skipped() if f.split == split),
        model=served.path,
    )
    if report is not None:
        from tftransfer.report import write_report

        result["report"] = write_report(
            report, interpretation, summary=result,
            data=data_report(folder), title=f"{served.path} on {data_dir}")
    return result


def predict_paths(model_path: str, paths: Sequence[str], top_k: int = 1) -> list:
    """Top-k predictions of an exported SavedModel for image files.

    Folders are searched recursively for files. Files that are missing or not
    usable images get an `error` instead of predictions; they do not stop the
    others.

    Args:
        model_path: A run folder, a SavedModel folder (see `ServedModel`) or
            a `.tflite` file (see `LiteRTModel`).
        paths: Image files and folders.
        top_k: Number of classes returned per file, most probable first;
            clipped to between 1 and the number of classes. Defaults to `1`.

    Returns:
        One dict per file, in order: `path`, and either `predictions` (a list of
        `{"class_name": ..., "probability": ...}`) or `error` (why the file is
        unusable, e.g. `"no such file"`).

    Raises:
        DataError: if `model_path` holds no SavedModel, or `paths` name no file.

    Example:

    >>> import os, tempfile, keras, tftransfer
    >>> from tftransfer.demo import write_demo_images
    >>> folder = tempfile.mkdtemp()
    >>> data_dir = write_demo_images(os.path.join(folder, "data"),
    ...                              images_per_class=4, image_size=32)
    >>> model = keras.Sequential([keras.Input((32, 32, 3)),
    ...                           keras.layers.GlobalAveragePooling2D(),
    ...                           keras.layers.Dense(3)])
    >>> export_dir = tftransfer.export_saved_model(
    ...     model, os.path.join(folder, "saved_model"), ["desert", "forest", "ocean"])
    >>> results = tftransfer.predict_paths(
    ...     export_dir, [os.path.join(data_dir, "forest"), "missing.jpg"], top_k=2)
    >>> len(results)
    5
    >>> [os.path.basename(result["path"]) for result in results[:2]]
    ['forest_000.jpg', 'forest_001.jpg']
    >>> [len(result["predictions"]) for result in results[:4]]
    [2, 2, 2, 2]
    >>> sorted(results[0]["predictions"][0])
    ['class_name', 'probability']
    >>> results[4]
    {'path': 'missing.jpg', 'error': 'no such file'}
    """
    served = load_served(model_path)
    files = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(walk_files(path))
        else:
            files.append(path)
    if not files:
        raise DataError("No image files given to predict.")
    results, usable = [], []
    for path in files:
        if not os.path.exists(path):
            results.append({"path": path, "error": "no such file"})
            continue
        status, reason, _, _ = check_image_file(path)
        results.append(
            {"path": path, "error": reason} if status != "used" else {"path": path}
        )
        if status == "used":
            usable.append(results[-1])
    probabilities = served.predict_files([r["path"] for r in usable])
    top_k = max(1, min(top_k, len(served.class_names)))
    for result, row in zip(usable, probabilities):
        order = np.argsort(-row)[:top_k]
        result["predictions"] = [
            {"class_name": served.class_names[i], "probability": float(row[i])}
            for i in order
        ]
    return results

"""Evaluate and predict through an exported SavedModel, as a server would.

Everything here calls the SavedModel's `serving_default` signature with raw file
bytes, so what is measured is exactly what a deployment serves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tftransfer.data import check_image_file, scan_image_folder, walk_files
from tftransfer.errors import DataError


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


class ServedModel:
    """A tftransfer SavedModel loaded with TensorFlow alone.

    Args:
        model_path: A run folder or a SavedModel folder.
    """

    def __init__(self, model_path: str):
        self.path = resolve_saved_model(model_path)
        self._loaded = tf.saved_model.load(self.path)
        self._serve = self._loaded.signatures["serving_default"]
        labels = os.path.join(self.path, "assets", "labels.txt")
        with open(labels) as handle:
            self.class_names = [line.rstrip("\n") for line in handle if line.strip()]

    def predict_bytes(
        self, contents: Sequence[bytes], batch_size: int = 32
    ) -> np.ndarray:
        """Returns class probabilities `(len(contents), num_classes)`."""
        outputs = []
        for start in range(0, len(contents), batch_size):
            batch = tf.constant(list(contents[start : start + batch_size]), tf.string)
            outputs.append(self._serve(image_bytes=batch)["probabilities"].numpy())
        if not outputs:
            return np.zeros([0, len(self.class_names)], "float32")
        return np.concatenate(outputs)

    def predict_files(self, paths: Sequence[str], batch_size: int = 32) -> np.ndarray:
        contents = []
        for path in paths:
            with open(path, "rb") as handle:
                contents.append(handle.read())
        return self.predict_bytes(contents, batch_size)


def classification_metrics(labels, predictions, class_names) -> dict:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix."""
    num_classes = len(class_names)
    confusion = np.zeros([num_classes, num_classes], "int64")
    np.add.at(confusion, (np.asarray(labels), np.asarray(predictions)), 1)
    per_class = {}
    for index, name in enumerate(class_names):
        true_positive = confusion[index, index]
        predicted = confusion[:, index].sum()
        actual = confusion[index, :].sum()
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = (
            2 * precision * recall / (precision + recall) if precision + recall else 0.0
        )
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(actual),
        }
    total = confusion.sum()
    return {
        "accuracy": float(np.trace(confusion) / total) if total else 0.0,
        "num_images": int(total),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def evaluate_folder(model_path: str, data_dir: str, batch_size: int = 32) -> dict:
    """Evaluates a served model on an image folder.

    Uses `test/` if `data_dir` has split folders (else `val/`/`validation/`), or
    every image when `data_dir` holds class folders directly. Class folders are
    matched to the model's classes by name.

    Returns:
        `classification_metrics` plus `split`, `num_skipped` and `model`.
    """
    served = ServedModel(model_path)
    folder = scan_image_folder(data_dir, validation_split=None)
    unknown = sorted(set(folder.class_names) - set(served.class_names))
    if unknown:
        raise DataError(
            f"Class folder(s) {unknown} of {data_dir!r} are not classes of the model "
            f"({served.class_names})."
        )
    split = next(
        s for s in ("test", "validation", "") if any(f.split == s for f in folder.files)
    )
    files = folder.used(split)
    labels = [served.class_names.index(f.class_name) for f in files]
    probabilities = served.predict_files([f.path for f in files], batch_size)
    result = classification_metrics(
        labels, probabilities.argmax(-1), served.class_names
    )
    result.update(
        split=split or "all",
        num_skipped=sum(1 for f in folder.skipped() if f.split == split),
        model=served.path,
    )
    return result


def predict_paths(model_path: str, paths: Sequence[str], top_k: int = 1) -> list:
    """Top-k predictions for image files (folders are searched for files).

    Returns:
        One dict per file: `path`, and either `predictions` (a list of
        `{"class_name", "probability"}`) or `error` when the file is unusable.
    """
    served = ServedModel(model_path)
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

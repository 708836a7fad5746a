"""What a classifier gets right and wrong: confusion, per-class scores, top losses.

`Interpretation` holds a model's probabilities for labelled examples, as
fastai's `ClassificationInterpretation` does, and answers the questions a user
asks after training: which classes are confused, how well each class does,
and which images the model gets most wrong. A run keeps its validation
predictions in `RUN_DIR/predictions.csv`, so that the report can be rebuilt
from the run folder alone (`Interpretation.read`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Optional

import numpy as np

from tftransfer.files import write_atomically

PREDICTIONS_FILE = "predictions.csv"
_FIXED_COLUMNS = ("path", "label", "predicted", "loss")


def classification_metrics(labels, predictions, class_names) -> dict:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix.

    Args:
        labels: True labels, integers.
        predictions: Predicted labels, integers.
        class_names: The names, in label order.

    Returns:
        A dict: `accuracy`, `num_images`, `per_class` (each class's
        `precision`, `recall`, `f1` and `support`) and `confusion_matrix`
        (rows true classes, columns predicted ones).

    Example:

    >>> result = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b"])
    >>> result["accuracy"], result["confusion_matrix"]
    (0.75, [[1, 1], [0, 2]])
    >>> result["per_class"]["b"]["precision"]
    0.6666666666666666
    """
    num_classes = len(class_names)
    confusion = np.zeros([num_classes, num_classes], "int64")
    np.add.at(confusion, (np.asarray(labels, "int64"),
                          np.asarray(predictions, "int64")), 1)
    per_class = {}
    for index, name in enumerate(class_names):
        true_positive = confusion[index, index]
        predicted = confusion[:, index].sum()
        actual = confusion[index, :].sum()
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = (2 * precision * recall / (precision + recall)
              if precision + recall else 0.0)
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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    logits = np.asarray(logits, "float64")
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class Interpretation:
    """A classifier's probabilities on labelled examples, and what they say.

    Args:
        probabilities: `(n, num_classes)` class probabilities.
        labels: `(n,)` true labels.
        class_names: The names, in label order.
        paths: The examples' files, or `None`.

    Example:

    >>> interpretation = Interpretation(
    ...     [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], [0, 1, 1], ["cat", "dog"],
    ...     paths=["a.jpg", "b.jpg", "c.jpg"])
    >>> interpretation.accuracy
    0.6666666666666666
    >>> interpretation.most_confused()
    [('dog', 'cat', 1)]
    >>> worst = interpretation.top_losses(1)[0]
    >>> worst["path"], worst["true"], worst["predicted"], round(worst["loss"], 3)
    ('c.jpg', 'dog', 'cat', 1.204)
    """

    def __init__(self, probabilities, labels, class_names: Sequence[str],
                 paths: Optional[Sequence[str]] = None):
        self.probabilities = np.asarray(probabilities, "float64").reshape(
            -1, len(class_names))
        self.labels = np.asarray(labels, "int64").reshape(-1)
        if len(self.labels) != len(self.probabilities):
            raise ValueError(
                "`probabilities` and `labels` must have one row per example. "
                f"Received: {len(self.probabilities)} rows of probabilities and "
                f"{len(self.labels)} labels")
        self.class_names = list(class_names)
        self.paths = list(paths) if paths is not None else [None] * len(self.labels)

    @classmethod
    def from_model(cls, model, dataset, class_names: Sequence[str],
                   paths: Optional[Sequence[str]] = None,
                   from_logits: bool = True) -> Interpretation:
        """Runs `model` (inference mode) over `(inputs, label)` batches.

        Args:
            model: A Keras classifier.
            dataset: A `tf.data.Dataset` (or iterable) of `(inputs, label)`
                batches, in the order of `paths`.
            class_names: The names, in label order.
            paths: The examples' files, or `None`.
            from_logits: The model returns logits (tftransfer's classifiers
                do). Defaults to `True`.
        """
        from tftransfer.heads import inference

        forward = inference(model)
        outputs, labels = [], []
        for inputs, batch_labels in dataset:
            outputs.append(np.asarray(forward(inputs), "float64"))
            labels.append(np.asarray(batch_labels).reshape(-1))
        outputs = (np.concatenate(outputs) if outputs
                   else np.zeros([0, len(class_names)]))
        labels = np.concatenate(labels) if labels else np.zeros([0], "int64")
        return cls(softmax(outputs) if from_logits else outputs, labels,
                   class_names, paths)

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=-1)

    @property
    def losses(self) -> np.ndarray:
        """Each example's cross-entropy, `-log p(true class)`."""
        rows = np.arange(len(self.labels))
        return -np.log(np.maximum(self.probabilities[rows, self.labels], 1e-12))

    @property
    def accuracy(self) -> float:
        return self.metrics()["accuracy"]

    @property
    def confusion_matrix(self) -> np.ndarray:
        """Counts: rows are true classes, columns predicted ones."""
        return np.asarray(self.metrics()["confusion_matrix"], "int64")

    def metrics(self) -> dict:
        """`classification_metrics` of the predictions, plus the mean `loss`."""
        result = classification_metrics(self.labels, self.predictions,
                                        self.class_names)
        result["loss"] = float(self.losses.mean()) if len(self.labels) else 0.0
        return result

    def most_confused(self, min_count: int = 1) -> list:
        """`(true, predicted, count)` of the off-diagonal cells, most first."""
        matrix = self.confusion_matrix
        pairs = [(self.class_names[t], self.class_names[p], int(matrix[t, p]))
                 for t in range(len(matrix)) for p in range(len(matrix))
                 if t != p and matrix[t, p] >= min_count]
        return sorted(pairs, key=lambda pair: -pair[2])

    def top_losses(self, k: int = 16) -> list:
        """The `k` examples with the highest loss, highest first.

        Each is a dict: `index`, `path`, `true`, `predicted`, `probability`
        (of the predicted class), `true_probability` and `loss`.
        """
        losses = self.losses
        order = np.argsort(-losses, kind="stable")[:max(0, k)]
        predictions = self.predictions
        return [{
            "index": int(i),
            "path": self.paths[i],
            "true": self.class_names[self.labels[i]],
            "predicted": self.class_names[predictions[i]],
            "probability": float(self.probabilities[i, predictions[i]]),
            "true_probability": float(self.probabilities[i, self.labels[i]]),
            "loss": float(losses[i]),
        } for i in order]

    def summary(self, top: int = 10) -> dict:
        """What `metrics.json` keeps: `metrics()` and the most-confused pairs."""
        return {**self.metrics(),
                "most_confused": [list(pair) for pair in self.most_confused()[:top]]}

    def write(self, path: str) -> None:
        """Writes the predictions as CSV: path, label, predicted, loss, and one
        probability column per class (named by the class)."""
        losses, predictions = self.losses, self.predictions

        def rows(stream):
            writer = csv.writer(stream)
            writer.writerow([*_FIXED_COLUMNS, *self.class_names])
            for i in range(len(self.labels)):
                writer.writerow([self.paths[i] or "", int(self.labels[i]),
                                 int(predictions[i]), repr(float(losses[i])),
                                 *(repr(float(p)) for p in self.probabilities[i])])

        write_atomically(path, rows, text=True)

    @classmethod
    def read(cls, path: str) -> Interpretation:
        """Reads what `write` wrote.

        Raises:
            ValueError: the file is not a predictions file.
        """
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header or tuple(header[:4]) != _FIXED_COLUMNS:
                raise ValueError(f"{path} is not a tftransfer predictions file: its "
                                 f"header must start with {','.join(_FIXED_COLUMNS)}.")
            names = header[4:]
            paths, labels, probabilities = [], [], []
            for row in reader:
                paths.append(row[0] or None)
                labels.append(int(row[1]))
                probabilities.append([float(p) for p in row[4:]])
        return cls(np.asarray(probabilities).reshape(-1, len(names)), labels, names,
                   paths)


def read_predictions(run_dir: str) -> Optional[Interpretation]:
    """The run's validation `Interpretation`, or `None` if it kept none."""
    path = os.path.join(run_dir, PREDICTIONS_FILE)
    return Interpretation.read(path) if os.path.exists(path) else None

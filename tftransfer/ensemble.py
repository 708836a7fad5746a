"""Ensembles of runs: one served model averaging its members' probabilities.

Runs trained on the same classes (other backbones, seeds or settings) make
different mistakes; their averaged probabilities are usually better than the
best of them. `ensemble` writes a run folder like `train`'s: a `model.keras`
and a SavedModel whose signatures are a single run's (the members run inside
it on one decoded image), `labels.txt`, validation predictions and
`metrics.json` with each member's accuracy beside the ensemble's. The
ensemble's model returns the log of its averaged probabilities as logits, so
it serves, evaluates and teaches (`distill --teacher`) as any run's model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import keras
import numpy as np
from keras import ops

from tftransfer.checkpoint import RunCheckpoint
from tftransfer.data import RESIZE_METHOD
from tftransfer.errors import DataError, SettingError, check_choice
from tftransfer.export import read_labels
from tftransfer.interpretation import PREDICTIONS_FILE, Interpretation, read_predictions
from tftransfer.run_folder import RunFolder, load_run_model
from tftransfer.settings import MAX_SERVING_PIXELS

ENSEMBLE_WEIGHTS = ("uniform", "fit")


@keras.saving.register_keras_serializable(package="tftransfer")
class ProbabilityAverage(keras.layers.Layer):
    """Logits whose softmax is the weighted mean of its inputs' softmax.

    Args:
        member_weights: One non-negative weight per input, summing to 1.

    Example:

    >>> layer = ProbabilityAverage([0.5, 0.5])
    >>> logits = layer([np.log([[0.2, 0.8]]), np.log([[0.6, 0.4]])])
    >>> np.round(ops.convert_to_numpy(ops.softmax(logits)), 3)
    array([[0.4, 0.6]], dtype=float32)
    """

    def __init__(self, member_weights: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.member_weights = [float(w) for w in member_weights]

    def call(self, logits):
        mean = sum(weight * ops.softmax(ops.cast(member, "float32"), axis=-1)
                   for weight, member in zip(self.member_weights, logits))
        # softmax(log p) == p for probabilities p; the floor keeps a class
        # that every member rules out finite.
        return ops.log(ops.maximum(mean, 1e-30))

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "member_weights": self.member_weights}


def build_ensemble(models: Sequence[keras.Model],
                   weights: Optional[Sequence[float]] = None) -> keras.Model:
    """One classifier averaging the probabilities of `models`.

    Args:
        models: Classifiers taking square images of pixels in 0..255 and
            returning logits over the same classes. A member trained at
            another image size than the largest gets the image resized inside.
        weights: One non-negative weight per member. Defaults to `None`
            (uniform).

    Returns:
        A `keras.Model` taking the largest member's image size, returning
        the log of the weighted mean probabilities (logits, for `softmax`).

    Example:

    >>> members = [keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
    ...                              keras.layers.Dense(3)]) for _ in range(2)]
    >>> model = build_ensemble(members)
    >>> pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3))
    >>> mean = np.mean([ops.softmax(m(pixels)) for m in members], axis=0)
    >>> bool(np.allclose(ops.softmax(model(pixels)), mean, atol=1e-6))
    True
    """
    weights = _normalised(weights, len(models))
    sizes = [int(m.input_shape[1]) for m in models]
    size = max(sizes)
    inputs = keras.Input((size, size, 3), name="pixels")
    outputs = []
    for index, (member, member_size) in enumerate(zip(models, sizes)):
        pixels = inputs
        if member_size != size:
            pixels = keras.layers.Resizing(member_size, member_size,
                                           interpolation=RESIZE_METHOD,
                                           name=f"resize_{index}")(pixels)
        # Renamed, so that two members built alike do not clash.
        named = keras.Model(member.inputs[0], member.outputs[0], name=f"member_{index}")
        outputs.append(named(pixels))
    averaged = ProbabilityAverage(weights, name="average", dtype="float32")(outputs)
    return keras.Model(inputs, averaged, name="ensemble")


def fit_member_weights(probabilities: Sequence[np.ndarray], labels,
                       steps: int = 2000) -> np.ndarray:
    """Non-negative weights, summing to 1, that minimise the log loss of the
    weighted mean of `probabilities` (each `(n, classes)`) on `labels`.

    Exponentiated gradient on the simplex: the weights stay non-negative and
    sum to 1 at every step, and the loss is convex in them.
    """
    stacked = np.stack([np.asarray(p, "float64") for p in probabilities])
    true = stacked[:, np.arange(stacked.shape[1]), np.asarray(labels)]  # (m, n)
    weights = np.full(len(stacked), 1 / len(stacked))
    for _ in range(steps):
        mixed = np.maximum(weights @ true, 1e-12)
        gradient = -(true / mixed).mean(axis=1)
        weights = weights * np.exp(-0.5 * (gradient - gradient.min()))
        weights /= weights.sum()
    return weights


def ensemble(runs: Sequence[str], output: str, weights: str = "uniform",
             overwrite: bool = False,
             serving_max_pixels: int = MAX_SERVING_PIXELS) -> dict:
    """Writes a run folder whose model averages the runs' probabilities.

    Args:
        runs: Two or more finished run folders (or `.keras` files beside a
            `labels.txt`) over the same classes.
        output: The ensemble's run folder.
        weights: `"uniform"`, or `"fit"`: non-negative weights fitted on the
            validation split by log loss (every member's `predictions.csv` must
            hold the same validation images). Defaults to `"uniform"`.
        overwrite: Replace a finished run in `output`. Defaults to `False`.
        serving_max_pixels: The SavedModel's pixel limit (see
            `export_saved_model`). Defaults to 40 million.

    Returns:
        The summary written to `metrics.json`: `member_weights`, `members`
        (each run's path and validation accuracy), the ensemble's
        `val_accuracy` (from the members' validation predictions, when each
        kept them), `class_names`, `saved_model`, `model`.

    Raises:
        SettingError: fewer than two runs, or an unknown `weights`.
        DataError: a member without a model or labels, members over other
            classes (named), or `"fit"` without the same validation images.

    Example:

    Two tiny models stand for run folders:

    >>> import tempfile
    >>> from tftransfer.export import write_labels
    >>> work, runs = tempfile.mkdtemp(), []
    >>> for seed in (0, 1):
    ...     keras.utils.set_random_seed(seed)
    ...     runs.append(os.path.join(work, f"run-{seed}"))
    ...     os.makedirs(runs[-1])
    ...     keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
    ...                       keras.layers.Dense(2)]).save(
    ...         os.path.join(runs[-1], "model.keras"))
    ...     write_labels(os.path.join(runs[-1], "labels.txt"), ["cat", "dog"])
    >>> summary = ensemble(runs, os.path.join(work, "ensemble"))
    >>> summary["member_weights"], summary["class_names"], summary["image_size"]
    ([0.5, 0.5], ['cat', 'dog'], 8)
    >>> sorted(os.listdir(summary["run_dir"]))
    ['labels.txt', 'metrics.json', 'model.keras', 'saved_model']
    """
    check_choice("weights", weights, ENSEMBLE_WEIGHTS)
    runs = [os.path.abspath(os.fspath(run)) for run in runs]
    if len(runs) < 2:
        raise SettingError(f"An ensemble needs two runs or more. Received: {runs}")
    class_names = same_classes(runs)
    predictions = [read_predictions(run) if os.path.isdir(run) else None
                   for run in runs]
    kept = all(p is not None for p in predictions) and all(
        p.paths == predictions[0].paths and np.array_equal(p.labels, predictions[0].labels)
        for p in predictions)
    if weights == "fit" and not kept:
        raise DataError(
            "--weights fit needs every member's validation predictions "
            f"({PREDICTIONS_FILE}) on the same images: runs of one data folder "
            "with the same --validation-split and --seed. Use --weights uniform.")
    labels = predictions[0].labels if kept else None
    member_weights = (fit_member_weights([p.probabilities for p in predictions], labels)
                      if weights == "fit" else np.full(len(runs), 1 / len(runs)))
    model = build_ensemble([load_run_model(run) for run in runs], member_weights)
    members = [{"run": run, "val_accuracy": accuracy_of(p), "weight": float(w)}
               for run, p, w in zip(runs, predictions, member_weights)]
    interpretation = None
    if kept:
        mixed = sum(w * p.probabilities for w, p in zip(member_weights, predictions))
        interpretation = Interpretation(mixed, labels, class_names, predictions[0].paths)
    summary = {"members": members, "member_weights": [float(w) for w in member_weights],
               "weights": weights}
    return write_combined_run(output, model, class_names, summary, interpretation,
                              overwrite, serving_max_pixels)


def write_combined_run(output: str, model: keras.Model, class_names: list,
                       summary: dict, interpretation: Optional[Interpretation],
                       overwrite: bool, serving_max_pixels: int) -> dict:
    """Writes the run folder of a model made from runs (an ensemble, a soup):
    `model.keras`, `labels.txt`, `saved_model/`, the validation predictions
    when known, and `metrics.json`: `summary`, the validation accuracy and
    where each file is. Returns what `metrics.json` holds."""
    summary = {"val_accuracy": accuracy_of(interpretation), **summary,
               "class_names": class_names}
    with RunFolder(output, overwrite) as folder:
        folder.checkpoint = RunCheckpoint(folder.path, {})
        folder.prepare(None, None)
        if interpretation is not None:
            interpretation.write(folder.file(PREDICTIONS_FILE))
        saved_model = folder.write_model(model, class_names, serving_max_pixels)
        summary.update(run_dir=folder.path, saved_model=saved_model,
                       model=folder.file("model.keras"),
                       image_size=int(model.input_shape[1]),
                       serving_max_pixels=serving_max_pixels)
        folder.finish(summary)
    return summary


def same_classes(runs: Sequence[str]) -> list:
    names = []
    for run in runs:
        labels = os.path.join(run if os.path.isdir(run) else os.path.dirname(run),
                              "labels.txt")
        found = read_labels(labels)
        if found is None:
            raise DataError(f"No labels.txt beside the model of {run}: expected a "
                            "finished tftransfer run folder.")
        names.append(found)
    for run, found in zip(runs[1:], names[1:]):
        if found != names[0]:
            missing = [n for n in names[0] if n not in found]
            extra = [n for n in found if n not in names[0]]
            detail = (f"missing {missing}, extra {extra}" if missing or extra
                      else "the same names in another order")
            raise DataError(
                f"The members of an ensemble must share their classes, in order: "
                f"{run} differs from {runs[0]} ({detail}). Train them on the "
                "same data folder.")
    return names[0]


def accuracy_of(interpretation: Optional[Interpretation]) -> Optional[float]:
    if interpretation is None:
        return None
    return float(np.mean(interpretation.predictions == np.asarray(interpretation.labels)))


def _normalised(weights, count: int) -> list:
    if weights is None:
        return [1 / count] * count
    weights = np.asarray(weights, "float64")
    if weights.shape != (count,) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("`weights` must be one non-negative number per member, "
                         f"not all 0. Received: weights={weights.tolist()}")
    return (weights / weights.sum()).tolist()

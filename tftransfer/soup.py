"""Model soups: the weight average of runs fine-tuned from one start.

Runs fine-tuned from the same pretrained weights (other seeds, rates or
epochs) tend to lie in one basin of the loss, so their averaged weights make
one network that is often as good as their ensemble, at one network's serving
cost (Wortsman et al. 2022, "Model soups"). `soup` averages every weight,
BatchNormalization's statistics included, as the paper does; `greedy=True`
adds the runs best first, each only if the validation accuracy does not fall.
Runs from another backbone or other starting weights are refused: their
weights do not correspond.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from tftransfer.data import image_folder_datasets
from tftransfer.ensemble import accuracy_of, same_classes, write_combined_run
from tftransfer.errors import DataError, SettingError
from tftransfer.interpretation import Interpretation, read_predictions
from tftransfer.run_folder import load_run_model
from tftransfer.settings import MAX_SERVING_PIXELS

# What must match for weights to correspond: the network and where it started.
SAME_START = ("backbone", "alpha", "weights", "image_size", "dropout")


def average_weights(models) -> list:
    """The element-wise mean of the models' weights.

    Args:
        models: Keras models of one architecture.

    Returns:
        A list of arrays in `get_weights` order, each the mean of the models'
        (in their dtype), for `set_weights`.

    Example:

    >>> import keras
    >>> models = [keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    ...           for _ in range(2)]
    >>> models[0].set_weights([np.ones((2, 1)), np.zeros(1)])
    >>> models[1].set_weights([np.full((2, 1), 3.0), np.ones(1)])
    >>> [w.tolist() for w in average_weights(models)]
    [[[2.0], [2.0]], [0.5]]
    """
    return _mean([model.get_weights() for model in models])


def _mean(weights: list) -> list:
    """The element-wise mean of several `get_weights` lists."""
    return [np.mean(arrays, axis=0).astype(arrays[0].dtype) for arrays in zip(*weights)]


def soup(runs: Sequence[str], output: str, greedy: bool = False,
         overwrite: bool = False, serving_max_pixels: int = MAX_SERVING_PIXELS) -> dict:
    """Writes a run folder whose network averages the runs' weights.

    Args:
        runs: Two or more finished run folders, fine-tuned from the same
            backbone and starting weights, over the same classes.
        output: The soup's run folder.
        greedy: Add the runs best first (by validation accuracy), each only if
            the soup's validation accuracy does not fall. Defaults to `False`
            (every run, uniformly).
        overwrite: Replace a finished run in `output`. Defaults to `False`.
        serving_max_pixels: The SavedModel's pixel limit (see
            `export_saved_model`). Defaults to 40 million.

    Returns:
        The summary written to `metrics.json`: `members` (each run, its
        validation accuracy and weight in the soup: 0 when greedy left it
        out), the soup's `val_accuracy` (on the first run's validation split,
        when its data folder is there), `class_names`, `saved_model`, `model`.

    Raises:
        SettingError: fewer than two runs.
        DataError: a member that is not a finished run folder, members over
            other classes, or from another backbone or start (named); greedy
            without the first run's data folder.

    Example:

    Two tiny models standing for finished runs of one start:

    >>> import keras, tempfile
    >>> from tftransfer.export import write_labels
    >>> from tftransfer.files import write_json_atomically
    >>> work, runs = tempfile.mkdtemp(), []
    >>> for seed in (0, 1):
    ...     keras.utils.set_random_seed(seed)
    ...     runs.append(os.path.join(work, f"run-{seed}"))
    ...     os.makedirs(runs[-1])
    ...     keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
    ...                       keras.layers.Dense(2)]).save(
    ...         os.path.join(runs[-1], "model.keras"))
    ...     write_labels(os.path.join(runs[-1], "labels.txt"), ["cat", "dog"])
    ...     write_json_atomically(os.path.join(runs[-1], "metrics.json"),
    ...                           {"backbone": "tiny", "settings": {}})
    >>> summary = soup(runs, os.path.join(work, "soup"))
    >>> [member["weight"] for member in summary["members"]]
    [0.5, 0.5]
    """
    runs = [os.path.abspath(os.fspath(run)) for run in runs]
    if len(runs) < 2:
        raise SettingError(f"A soup needs two runs or more. Received: {runs}")
    class_names = same_classes(runs)
    settings = [_settings(run) for run in runs]
    for run, setting in zip(runs[1:], settings[1:]):
        differ = [f"{key}: {settings[0].get(key)!r} there, {setting.get(key)!r} here"
                  for key in SAME_START if setting.get(key) != settings[0].get(key)]
        if differ:
            raise DataError(
                f"{run} cannot join a soup with {runs[0]}: their weights do not "
                f"correspond ({'; '.join(differ)}). A soup averages runs fine-tuned "
                "from the same backbone and starting weights; combine other runs "
                "with `tftransfer ensemble`.")
    models = [load_run_model(run) for run in runs]
    shapes = [[w.shape for w in model.get_weights()] for model in models]
    for run, shape in zip(runs[1:], shapes[1:]):
        if shape != shapes[0]:
            raise DataError(f"{run} and {runs[0]} have networks of other shapes; "
                            "a soup needs the same network.")
    validation = _validation(settings[0], greedy)
    # Read once: the soup is evaluated in the first member's model, whose
    # weights it overwrites.
    weights = [member.get_weights() for member in models]
    model = models[0]

    def evaluated(indices) -> Interpretation:
        model.set_weights(_mean([weights[i] for i in indices]))
        dataset, paths = validation
        return Interpretation.from_model(model, dataset, class_names, paths)

    accuracies = [accuracy_of(read_predictions(run)) for run in runs]
    chosen = list(range(len(runs)))
    if greedy:
        order = sorted(chosen, key=lambda i: -(accuracies[i] or 0))
        chosen, best = [order[0]], accuracy_of(evaluated([order[0]]))
        for index in order[1:]:
            score = accuracy_of(evaluated(chosen + [index]))
            if score >= best:
                chosen, best = chosen + [index], score
    interpretation = evaluated(chosen) if validation else None
    if interpretation is None:
        model.set_weights(_mean([weights[i] for i in chosen]))
    members = [{"run": run, "val_accuracy": accuracy,
                "weight": 1 / len(chosen) if index in chosen else 0.0}
               for index, (run, accuracy) in enumerate(zip(runs, accuracies))]
    return write_combined_run(output, model, class_names,
                              {"members": members, "greedy": greedy}, interpretation,
                              overwrite, serving_max_pixels)


def _settings(run: str) -> dict:
    path = os.path.join(run, "metrics.json")
    if not os.path.isfile(path):
        raise DataError(f"{run} is not a finished tftransfer run folder (no "
                        "metrics.json); a soup reads each run's settings.")
    with open(path, encoding="utf-8") as handle:
        summary = json.load(handle)
    return {**summary.get("settings", {}),
            **{key: summary.get(key) for key in ("backbone", "alpha", "image_size")}}


def _validation(settings: dict, required: bool):
    """`(batches, paths)` of the first run's validation split, or `None` when
    its data folder is gone (an error when `required`)."""
    data_dir = settings.get("data_dir")
    if not data_dir or not os.path.isdir(data_dir):
        if required:
            raise DataError(
                f"A greedy soup evaluates on the first run's validation split, but "
                f"its data folder {data_dir!r} is not there. Put it back, or drop "
                "--greedy.")
        return None
    data = image_folder_datasets(data_dir, settings["image_size"], batch_size=32,
                                 validation_split=settings.get("validation_split", 0.2),
                                 seed=settings.get("seed", 0), memory_budget=0)
    return data.validation, data.folder.paths_and_labels("validation")[0]

"""Per-epoch checkpoints of a run, so that a killed run resumes where it stopped.

`keras.callbacks.BackupAndRestore` is not used: it restores one `fit` call, while a
run is two (the head on cached features, then the top of the backbone), and a
kill between its weights file and its metadata file leaves the two out of step.
Here one `.npz` file holds the model's weights, the optimizer's state and the epoch
it belongs to; it is written beside the old one and renamed over it, so a kill at
any moment leaves either the previous checkpoint or the new one, whole.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Optional

import keras
import numpy as np

from tftransfer.errors import RunFolderError
from tftransfer.files import write_atomically

CHECKPOINT_FILE = "checkpoint.npz"

# Settings added after checkpoints were first written, with the value a
# checkpoint without them was trained with: such a run still resumes.
# A checkpoint from before `fine_tune_warmup` existed resumes under any
# warm-up (`None`): it only shapes fine-tuning steps not yet taken, and a run
# checkpointed mid-fine-tuning has taken its first steps already.
# Settings added since runs were first written, and what they were before.
# A run from before resumes only if the setting is still that, except for
# those in ANY_VALUE_ADDED (the warm-up was on before it was a setting).
ADDED_SETTINGS = {"lr_decay": 1.0, "fine_tune_warmup": None, "cut": None,
                  "cut_tolerance": 0.01, "cut_layer": None,
                  "prune_filters": None, "prune": None, "fine_tune_ema": 0.0}
ANY_VALUE_ADDED = {"fine_tune_warmup"}


class RunCheckpoint:
    """The training state of a run folder: weights, optimizer state and epoch.

    Args:
        run_dir: The run folder; the checkpoint is `RUN_DIR/checkpoint.npz`.
        settings: Everything that makes two runs the same run (backbone, data,
            schedule...). A checkpoint written under other settings is refused.
    """

    def __init__(self, run_dir: str, settings: dict):
        self.path = os.path.join(run_dir, CHECKPOINT_FILE)
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))

    def load(self) -> Optional[dict]:
        """Returns the saved state (`epoch`, `phase`, arrays) or `None`.

        Raises:
            RunFolderError: the checkpoint belongs to a run with other settings,
                or cannot be read.
        """
        if not os.path.exists(self.path):
            return None
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            meta = json.loads(str(arrays.pop("meta")))
            meta["settings"], meta["num_model"], meta["num_optimizer"]
        except Exception as error:  # zipfile, EOF, JSON, missing keys: all unreadable.
            raise RunFolderError(
                f"The checkpoint {self.path} cannot be read ({error}). Pass "
                "--overwrite (overwrite=True) to start the run over."
            ) from error
        def value(settings, key):
            return settings.get(key, ADDED_SETTINGS.get(key))

        different = sorted(
            key
            for key in set(meta["settings"]) | set(self.settings)
            if value(meta["settings"], key) != value(self.settings, key)
            and not (key not in meta["settings"] and key in ANY_VALUE_ADDED)
        )
        if different:
            changes = ", ".join(
                f"{key}: {value(meta['settings'], key)!r} then, "
                f"{value(self.settings, key)!r} now"
                for key in different
            )
            raise RunFolderError(
                f"{os.path.dirname(self.path)} holds an unfinished run with other "
                f"settings ({changes}). Run the same command again to resume it, "
                "pass --overwrite (overwrite=True) to start over, or choose another "
                "--output."
            )
        model = [arrays[f"model_{i}"] for i in range(meta["num_model"])]
        optimizer = [arrays[f"optimizer_{i}"] for i in range(meta["num_optimizer"])]
        return {**meta, "model": model, "optimizer": optimizer}

    def save(self, model: keras.Model, training_model: keras.Model, epoch: int,
             phase: str) -> None:
        """Saves `model`'s weights and `training_model`'s optimizer after `epoch`.

        `model` is what the phase trains (the head alone while the backbone is
        frozen, saving writing the unchanged backbone every epoch).
        """
        optimizer = getattr(training_model, "optimizer", None)
        optimizer_values = [v.numpy() for v in optimizer.variables] if optimizer else []
        meta = {
            "epoch": epoch,
            "phase": phase,
            "weights_of": model.name,
            "training_model": training_model.name,
            "settings": self.settings,
            "num_model": len(model.weights),
            "num_optimizer": len(optimizer_values),
        }
        arrays = {f"model_{i}": v.numpy() for i, v in enumerate(model.weights)}
        arrays.update({f"optimizer_{i}": v for i, v in enumerate(optimizer_values)})
        arrays["meta"] = np.array(json.dumps(meta))
        # No fsync: a killed process loses nothing the kernel holds, and the
        # rename is atomic; fsync would only guard against power loss, at a
        # cost paid every epoch.
        write_atomically(self.path, lambda stream: np.savez(stream, **arrays),
                         prefix=".tmp-checkpoint-", suffix=".npz")

    def callback(self, model: keras.Model, training_model: keras.Model,
                 phase: str) -> keras.callbacks.Callback:
        """A callback that saves a checkpoint at the end of every epoch."""
        return keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: self.save(
                model, training_model, epoch + 1, phase
            )
        )

    def remove_temporaries(self) -> None:
        """Removes the partial checkpoint file a kill may have left behind."""
        directory = os.path.dirname(self.path)
        if os.path.isdir(directory):
            for entry in os.listdir(directory):
                if entry.startswith(".tmp-checkpoint-"):
                    os.remove(os.path.join(directory, entry))

    def clear(self) -> None:
        """Removes the checkpoint and any partial one."""
        self.remove_temporaries()
        if os.path.exists(self.path):
            os.remove(self.path)


def restore_weights(model: keras.Model, state: dict) -> None:
    """Sets `model`'s weights from a state returned by `RunCheckpoint.load`.

    A checkpoint of one of `model`'s layers (`save`'s `model` was, say, the
    head while the backbone was frozen) restores that layer.
    """
    if state["weights_of"] != model.name and any(
            layer.name == state["weights_of"] for layer in model.layers):
        model = model.get_layer(state["weights_of"])
    if len(model.weights) != len(state["model"]):
        raise RunFolderError(
            "The checkpoint does not fit the model it should resume "
            f"({len(state['model'])} weights saved, {len(model.weights)} in the "
            "model). Pass --overwrite (overwrite=True) to start over."
        )
    for variable, value in zip(model.weights, state["model"]):
        variable.assign(value)
    refresh_normalization(model)


def refresh_normalization(model: keras.Model) -> None:
    """Keras' `Normalization` copies its mean and variance into constants when
    adapted or loaded from a file, not when its variables are assigned: after
    assigning them, each such layer is told to copy them again."""
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Normalization) and layer.built:
            layer.finalize_state()


def restore_optimizer(training_model: keras.Model, state: dict) -> bool:
    """Restores the optimizer state of a compiled model; False if it does not fit."""
    optimizer = training_model.optimizer
    optimizer.build(training_model.trainable_variables)
    if len(optimizer.variables) != len(state["optimizer"]) or any(
        tuple(v.shape) != value.shape
        for v, value in zip(optimizer.variables, state["optimizer"])
    ):
        return False
    for variable, value in zip(optimizer.variables, state["optimizer"]):
        variable.assign(value)
    return True


def truncate_history(path: str, last_epoch: int) -> None:
    """Keeps the rows of `history.csv` up to `last_epoch`, dropping later ones.

    An epoch's row is written just before its checkpoint; a kill between the two
    leaves a row the resumed run will write again.
    """
    if not os.path.exists(path):
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    kept = [rows[0]] + [row for row in rows[1:] if row and int(row[0]) <= last_epoch]
    write_atomically(path, lambda stream: csv.writer(stream).writerows(kept),
                     text=True, prefix=".tmp-history-")

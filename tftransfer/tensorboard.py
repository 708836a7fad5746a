"""TensorBoard logs of a run: `tensorboard --logdir RUN_DIR/logs`.

While a run trains, Keras' own `TensorBoard` callback writes each epoch's
scalars (`epoch_loss`, `epoch_accuracy`, `epoch_learning_rate`) under
`logs/train` and `logs/validation`. Both phases share one step axis: the
epoch, counted from the run's start (0-based, as Keras counts).

A resumed run would log again the epochs a kill interrupted, so the logs are
rebuilt from `history.csv` (the finished epochs) before it goes on
(`restart_logs`). At the end, `write_run_summary` adds the validation
confusion matrix as an image and the run's settings as hyperparameters (the
HParams dashboard).
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import keras
import numpy as np

LOGS_FOLDER = "logs"


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras' `TensorBoard` callback, per epoch only.

    Its learning rate is one tag (`epoch_learning_rate`), the highest rate
    with `--lr-decay`, as `history.csv` keeps it. Keras also logs each
    validation pass against the optimizer's iterations
    (`evaluation_loss_vs_iterations`); each phase has its own optimizer, whose
    count starts again at 0, so those curves would fold back on themselves.
    """

    def on_test_end(self, logs=None):
        self._pop_writer()

    def _collect_learning_rate(self, logs):
        # One `learning_rate` tag in every phase and after a resume, as
        # history.csv keeps it: with --lr-decay, the top block's (highest).
        rate = learning_rate_of(self.model)
        return logs if rate is None else {**logs, "learning_rate": rate}


def learning_rate_of(model: keras.Model) -> Optional[float]:
    """The learning rate `model`'s optimizer is at: the highest of several
    (`MultiOptimizer`), or `None` if it has none."""
    optimizer = getattr(model, "optimizer", None)
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    optimizers = getattr(optimizer, "optimizers", None) or [optimizer]
    rates = [float(keras.ops.convert_to_numpy(o.learning_rate)) for o in optimizers
             if isinstance(o, keras.optimizers.Optimizer)
             and not hasattr(o, "optimizers")]
    return max(rates) if rates else None


def logs_callback(log_dir: str) -> keras.callbacks.TensorBoard:
    """A `TensorBoard` callback writing per-epoch scalars into `log_dir`."""
    return EpochTensorBoard(log_dir=log_dir, write_graph=False,
                            update_freq="epoch", profile_batch=0)


def restart_logs(log_dir: str, history: Optional[dict] = None) -> None:
    """Empties `log_dir`, then writes `history`'s finished epochs into it.

    Args:
        log_dir: The run's `logs` folder.
        history: `read_history` of the run's `history.csv`, or `None` (a run
            starting afresh).
    """
    if os.path.isdir(log_dir):
        shutil.rmtree(log_dir)
    if not history or not history.get("loss"):
        return
    import tensorflow as tf

    for run, prefix in (("train", ""), ("validation", "val_")):
        writer = tf.summary.create_file_writer(os.path.join(log_dir, run))
        with writer.as_default():
            for key, values in history.items():
                if key == "phase" or not key.startswith(prefix) or (
                        not prefix and key.startswith("val_")):
                    continue
                name = "epoch_" + key[len(prefix):]
                for epoch, value in enumerate(values):
                    tf.summary.scalar(name, value, step=epoch)
        writer.close()


def write_run_summary(log_dir: str, settings: dict, metrics: dict, step: int,
                      confusion_png: Optional[str] = None) -> None:
    """Adds the settings as hyperparameters and the confusion matrix image.

    Args:
        log_dir: The run's `logs` folder.
        settings: The run's settings (`metrics.json["settings"]`); values
            that are not numbers, strings or booleans are written as text.
        metrics: Final metrics, e.g. `{"val_accuracy": 0.9}`, shown beside the
            hyperparameters.
        step: The step to log at: the last epoch (0-based).
        confusion_png: The confusion matrix PNG, or `None`.
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hparams

    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        hparams.hparams({key: _hparam(value) for key, value in settings.items()})
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                tf.summary.scalar(key, value, step=step)
        if confusion_png and os.path.isfile(confusion_png):
            with open(confusion_png, "rb") as handle:
                image = tf.io.decode_png(handle.read(), channels=3)
            tf.summary.image("confusion_matrix", image[None], step=step)
    writer.close()


def _hparam(value):
    if isinstance(value, (bool, int, float, str)) and not (
            isinstance(value, float) and not np.isfinite(value)):
        return value
    return str(value)

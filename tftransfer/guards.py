"""Stopping a run at the first epoch whose loss is not a finite number.

Keras' `TerminateOnNaN` stops `fit` quietly, and the epoch's checkpoint and
`history.csv` row would then hold the NaN weights: a resume would start from
them, and the export would serve them. `FiniteLoss` runs before those
callbacks and raises instead, so the run folder keeps the last finite epoch.
"""

from __future__ import annotations

import math
from typing import Optional

import keras

from tftransfer.errors import TrainingDiverged


class FiniteLoss(keras.callbacks.Callback):
    """Raises `TrainingDiverged` at the end of an epoch whose loss is NaN or inf.

    Args:
        phase: The phase being trained (`"head"` or `"fine_tune"`).
        learning_rate: That phase's rate, for the message. Defaults to `None`.
        rate_option: The option that sets it. Defaults to `"--learning-rate"`.

    Example:

    >>> guard = FiniteLoss("head", 0.01)
    >>> guard.on_epoch_end(0, {"loss": 0.5})
    >>> guard.on_epoch_end(1, {"loss": float("nan")})
    Traceback (most recent call last):
    ...
    tftransfer.errors.TrainingDiverged: The training loss became nan in epoch 2 (head phase). The run folder, if any, keeps the last finished epoch with a finite loss. Lower the learning rate (--learning-rate, now 0.01) and start over (--overwrite), or look for broken images in the data report.
    """

    def __init__(self, phase: str, learning_rate: Optional[float] = None,
                 rate_option: str = "--learning-rate"):
        super().__init__()
        self.phase = phase
        self.learning_rate = learning_rate
        self.rate_option = rate_option

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        now = "" if self.learning_rate is None else f", now {self.learning_rate:.3g}"
        raise TrainingDiverged(
            f"The training loss became {float(loss)} in epoch {epoch + 1} "
            f"({self.phase.replace('_', '-')} phase). The run folder, if any, keeps "
            "the last finished epoch with a finite loss. Lower the learning rate "
            f"({self.rate_option}{now}) and start over (--overwrite), or look for "
            "broken images in the data report.")

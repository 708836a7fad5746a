"""The learning-rate range test (Smith 2015; fastai's `lr_find`), for Keras models.

Keras has no learning-rate finder (keras#8891, keras-contrib#204), so it is
written here: the rate grows exponentially from `min_learning_rate` to
`max_learning_rate`, one step per batch; the loss is smoothed (an
exponential moving average, debiased) and the test stops once it exceeds
`divergence` times its minimum. The model's weights are put back afterwards,
exactly, and its compiled optimizer is never touched: the test steps with a
fresh Adam of its own, the optimizer tftransfer trains with.

The suggested rate is fastai's "valley" for a model that has still to learn
(a new head): the middle of the longest run of decreasing loss. A model that
is trained already (fine-tuning starts from a trained head) shows no such
fall, only noise and then divergence: its suggestion is a tenth of the rate
where the loss diverged, the usual advice for fine-tuning. On cached
features or activations the whole test takes seconds (see `Engine`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tftransfer.errors import check_choice

MIN_LEARNING_RATE = 1e-7
MAX_LEARNING_RATE = 10.0
NUM_STEPS = 100
SMOOTHING = 0.98
DIVERGENCE = 4.0
# Fine-tuning steps cost a pass through the unfrozen top: fewer of them, over
# the rates a pretrained network can take (above 0.1 it is only destroyed;
# below 1e-6 it does not move in a run's steps), at about 6.5 steps a decade,
# and less smoothing, whose lag would span decades over so few steps.
FINE_TUNE_RANGE = {"min_learning_rate": 1e-6, "max_learning_rate": 0.1,
                   "num_steps": 34, "smoothing": 0.9, "suggestion": "divergence"}
SUGGESTIONS = ("valley", "divergence")


@dataclasses.dataclass
class LRFinderResult:
    """What the range test measured.

    Attributes:
        learning_rates: The rate of each step taken.
        losses: The smoothed loss after each step.
        suggested_learning_rate: See `suggest`.
        minimum_loss_learning_rate: The rate at the smoothed loss's minimum.
        stopped_early: The loss diverged before `max_learning_rate`.
        seconds: How long the test took.

    Example:

    >>> result = LRFinderResult([1e-4, 1e-3, 1e-2], [0.7, 0.5, 2.0], 1e-3, 1e-3,
    ...                         True)
    >>> result.record()["steps"], result.record()["suggested_learning_rate"]
    (3, 0.001)
    """

    learning_rates: list
    losses: list
    suggested_learning_rate: float
    minimum_loss_learning_rate: float
    stopped_early: bool
    seconds: float = 0.0

    def record(self) -> dict:
        """The result as JSON-ready numbers (what `metrics.json` keeps)."""
        return {
            "suggested_learning_rate": self.suggested_learning_rate,
            "minimum_loss_learning_rate": self.minimum_loss_learning_rate,
            "stopped_early": self.stopped_early,
            "steps": len(self.learning_rates),
            "seconds": round(self.seconds, 2),
            "learning_rates": [float(r) for r in self.learning_rates],
            "losses": [float(v) for v in self.losses],
        }

    def plot(self, path: str) -> Optional[str]:
        """Draws the smoothed loss against the rate, the suggestion marked, as a
        PNG; returns `path`, or `None` with a warning if it cannot be drawn."""
        return plot_record(self.record(), path)


def plot_record(record: dict, path: str) -> Optional[str]:
    """`LRFinderResult.plot` of a `record()`, whose suggestion a caller may have
    changed (the engine caps fine-tuning's)."""
    from tftransfer.plots import draw, learning_rate_range

    return draw(learning_rate_range, path, record["learning_rates"],
                record["losses"], record["suggested_learning_rate"])


def lr_find(model: keras.Model, train, loss=None,
            min_learning_rate: float = MIN_LEARNING_RATE,
            max_learning_rate: float = MAX_LEARNING_RATE,
            num_steps: int = NUM_STEPS, smoothing: float = SMOOTHING,
            divergence: float = DIVERGENCE,
            suggestion: str = "valley") -> LRFinderResult:
    """Runs the learning-rate range test on `model`; restores its weights.

    Args:
        model: The Keras model to train (its trainable weights move during
            the test and are restored after).
        train: A `tf.data.Dataset` (or iterable) of `(inputs, target)`
            batches; repeated if it has fewer than `num_steps` batches.
        loss: A Keras loss. Defaults to `None`: sparse categorical
            cross-entropy on logits (tftransfer's classifiers).
        min_learning_rate: The first step's rate. Defaults to `1e-7`.
        max_learning_rate: The last step's rate. Defaults to `10`.
        num_steps: Steps from the first rate to the last. Defaults to `100`.
        smoothing: The loss's moving-average factor. Defaults to `0.98`.
        divergence: Stop once the smoothed loss exceeds this many times its
            minimum. Defaults to `4`.
        suggestion: `"valley"` (fastai's, for a model still to train) or
            `"divergence"` (a tenth of the rate where the loss diverged, for
            a trained model being fine-tuned). Defaults to `"valley"`.

    Returns:
        An `LRFinderResult`.

    Raises:
        ValueError: a bad range or step count, or an empty `train`.

    Example:

    >>> import numpy as np, keras, tensorflow as tf
    >>> x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    >>> y = (x[:, 0] > 0).astype("int32")
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    >>> before = [w.copy() for w in model.get_weights()]
    >>> result = lr_find(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(16))
    >>> 1e-7 <= result.suggested_learning_rate <= 10
    True
    >>> all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    True
    """
    _check_range(min_learning_rate, max_learning_rate, num_steps, suggestion)
    import time

    started = time.perf_counter()
    loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.Adam(min_learning_rate)
    weights = model.get_weights()
    variables = model.trainable_variables
    # Adam's slots made now, not on the first call, and one signature for
    # every batch (the last may be short): the step is traced once, not three
    # times (about 0.85 s each for MobileNetV2's top).
    optimizer.build(variables)

    @tf.function(input_signature=_signature(train), reduce_retracing=True)
    def step(inputs, targets):
        with tf.GradientTape() as tape:
            value = loss(targets, model(inputs, training=True))
        optimizer.apply_gradients(zip(tape.gradient(value, variables), variables))
        return value

    ramp = _Ramp(min_learning_rate, max_learning_rate, num_steps, smoothing,
                 divergence)
    try:
        batches = _cycle(train)
        for i in range(num_steps):
            optimizer.learning_rate.assign(ramp.rate(i))
            if ramp.add(i, float(step(*next(batches)))):
                break
    finally:
        model.set_weights(weights)
    return ramp.result(suggestion, time.perf_counter() - started)


def lr_find_in_fit(model: keras.Model, train, schedule,
                   min_learning_rate: float = MIN_LEARNING_RATE,
                   max_learning_rate: float = MAX_LEARNING_RATE,
                   num_steps: int = NUM_STEPS, smoothing: float = SMOOTHING,
                   divergence: float = DIVERGENCE,
                   suggestion: str = "valley") -> LRFinderResult:
    """`lr_find` through `model`'s own compiled `fit`, whose step it traces.

    `model` is compiled with an optimizer whose rate is `schedule`, an
    `AdjustableWarmup`; the test sets its `override` at each step, so the
    training step `fit` traces here is the one the training after reuses
    (with the same `train` batches' shapes): the test adds its steps to a
    run, not a trace of its own. Afterwards the weights, the optimizer's
    variables (its step count, moments and average) and the metrics are as
    they were, `override` is 0, and `schedule.learning_rate` is left for the
    caller to set.

    Args:
        model: A compiled Keras model (its optimizer's rate `schedule`).
        train: The `tf.data.Dataset` the training after fits on.
        schedule: The optimizer's `AdjustableWarmup`.
        min_learning_rate, max_learning_rate, num_steps, smoothing,
        divergence, suggestion: As `lr_find`'s.

    Returns:
        An `LRFinderResult`.

    Raises:
        ValueError: a bad range or step count, or an empty `train`.

    Example:

    >>> import numpy as np, keras, tensorflow as tf
    >>> from tftransfer.train import AdjustableWarmup
    >>> x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    >>> y = (x[:, 0] > 0).astype("int32")
    >>> train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    >>> schedule = AdjustableWarmup(1e-3)
    >>> model.compile(keras.optimizers.Adam(schedule), keras.losses.
    ...     SparseCategoricalCrossentropy(from_logits=True))
    >>> before = [w.copy() for w in model.get_weights()]
    >>> result = lr_find_in_fit(model, train, schedule)
    >>> 1e-7 <= result.suggested_learning_rate <= 10
    True
    >>> all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    True
    >>> int(model.optimizer.iterations), float(schedule.override)
    (0, 0.0)
    """
    _check_range(min_learning_rate, max_learning_rate, num_steps, suggestion)
    import time

    started = time.perf_counter()
    _require_batches(train)
    ramp = _Ramp(min_learning_rate, max_learning_rate, num_steps, smoothing,
                 divergence)
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    weights = model.get_weights()
    state = [v.numpy() for v in optimizer.variables]
    try:
        model.fit(train.repeat(), epochs=1, steps_per_epoch=num_steps, verbose=0,
                  shuffle=False, callbacks=[_RangeTest(ramp, schedule)])
    finally:
        schedule.override.assign(0.0)
        model.set_weights(weights)
        for variable, value in zip(optimizer.variables, state):
            variable.assign(value)
        model.reset_metrics()
    return ramp.result(suggestion, time.perf_counter() - started)


class _RangeTest(keras.callbacks.Callback):
    """Sets each step's rate of `ramp` and stops `fit` when the loss diverges."""

    def __init__(self, ramp: _Ramp, schedule):
        super().__init__()
        self.ramp, self.schedule = ramp, schedule

    def on_train_batch_begin(self, batch, logs=None):
        self.schedule.override.assign(self.ramp.rate(batch))
        self.model.reset_metrics()  # Its logs are then this step's loss alone.

    def on_train_batch_end(self, batch, logs=None):
        if self.ramp.add(batch, float(logs["loss"])):
            self.model.stop_training = True


class _Ramp:
    """The test's rates, and the smoothed losses of the steps taken."""

    def __init__(self, min_learning_rate, max_learning_rate, num_steps, smoothing,
                 divergence):
        self.first, self.smoothing, self.divergence = (min_learning_rate, smoothing,
                                                       divergence)
        self.factor = (max_learning_rate / min_learning_rate) ** (1 / (num_steps - 1))
        self.warmup = max(3, num_steps // 10)
        self.rates, self.losses = [], []
        self.average, self.best, self.stopped = 0.0, math.inf, False

    def rate(self, i: int) -> float:
        return self.first * self.factor ** i

    def add(self, i: int, value: float) -> bool:
        """Records step `i`'s loss; `True` once the test should stop."""
        if not math.isfinite(value):
            self.stopped = True
            return True
        self.average = self.smoothing * self.average + (1 - self.smoothing) * value
        smoothed = self.average / (1 - self.smoothing ** (i + 1))
        self.rates.append(self.rate(i))
        self.losses.append(smoothed)
        # The first steps' losses are a few batches' noise (tiny ones for a
        # trained head): they set no minimum to diverge from.
        if i >= self.warmup:
            self.best = min(self.best, smoothed)
        self.stopped = i > self.warmup and smoothed > self.divergence * self.best
        return self.stopped

    def result(self, suggestion: str, seconds: float) -> LRFinderResult:
        rates, losses = self.rates, self.losses
        if len(rates) < 2:
            raise ValueError("The range test diverged at once: the loss is not "
                             f"finite even at learning rate {self.first}. Check "
                             "the data and the model.")
        return LRFinderResult(
            rates, losses,
            valley(rates, losses) if suggestion == "valley" else float(rates[-1]) / 10,
            rates[int(np.argmin(losses))], self.stopped, seconds)


def _check_range(min_learning_rate, max_learning_rate, num_steps, suggestion):
    if not 0 < min_learning_rate < max_learning_rate:
        raise ValueError("The range test needs 0 < min_learning_rate < "
                         f"max_learning_rate. Received: {min_learning_rate}, "
                         f"{max_learning_rate}")
    if num_steps < 5:
        raise ValueError(f"`num_steps` must be at least 5. Received: {num_steps}")
    check_choice("suggestion", suggestion, SUGGESTIONS)


def valley(rates, losses) -> float:
    """fastai's "valley" suggestion: within the longest run of decreasing loss
    (a longest decreasing subsequence), the rate half way along its middle
    third.

    Example:

    >>> rates = [10.0 ** e for e in range(-7, 0)]
    >>> valley(rates, [1.0, 0.98, 0.9, 0.6, 0.3, 0.5, 3.0])
    1e-06
    """
    start, end = _longest_valley(losses)
    third = (end - start) / 3
    return float(rates[start + int(third) + int(third / 2)])


def _longest_valley(losses) -> tuple:
    """`(start, end)` of the longest decreasing subsequence of `losses`."""
    n = len(losses)
    lengths = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lengths[i] < lengths[j] + 1:
                lengths[i] = lengths[j] + 1
    end = int(np.argmax(lengths))
    return end - lengths[end] + 1, end


def _signature(train) -> Optional[tuple]:
    """`(inputs, target)` specs of a `tf.data.Dataset` of such pairs, with any
    batch size; `None` for other iterables (traced on their first batch)."""
    spec = getattr(train, "element_spec", None)
    if not isinstance(spec, tuple) or len(spec) != 2:
        return None
    if not all(isinstance(s, tf.TensorSpec) and s.shape.rank
               for s in tf.nest.flatten(spec)):
        return None
    return tuple(tf.nest.map_structure(
        lambda s: tf.TensorSpec([None, *s.shape[1:]], s.dtype), part) for part in spec)


def _require_batches(dataset) -> None:
    """Raises `ValueError` if `dataset` holds no batch."""
    if not any(True for _ in itertools.islice(iter(dataset), 1)):
        raise ValueError("The range test needs training batches; the dataset "
                         "is empty.")


def _cycle(dataset):
    """The batches of `dataset`, over and over."""
    _require_batches(dataset)
    while True:
        yield from dataset

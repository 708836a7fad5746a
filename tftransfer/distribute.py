"""Training across machines: `distributed_fit`, our own loop where Keras' `fit` fails.

On one machine Keras' `fit` trains under every strategy. Across machines it
cannot: Keras 3's `fit` fails under `MultiWorkerMirroredStrategy` ("Attempt to
convert a value (PerReplica ...)", keras-team/keras#20585,
tensorflow/tensorflow#72388), so `distributed_fit` runs our own training step
through `strategy.run`, with the same callbacks (history, checkpoints) as
`fit`. See `tftransfer.workers` for how the workers share the images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Optional

import keras
import tensorflow as tf

from tftransfer.workers import LOST_PEER_ERRORS, Workers, lost_worker


def distributed_fit(
    workers: Workers,
    model: keras.Model,
    train: tf.data.Dataset,
    validation: tf.data.Dataset,
    epochs: int,
    initial_epoch: int = 0,
    callbacks: Optional[list] = None,
    class_weight: Optional[dict] = None,
    verbose="auto",
    example_losses: Optional[Callable] = None,
) -> keras.callbacks.History:
    """`model.fit` for a compiled classifier, run through `strategy.run`.

    For strategies under which Keras' `fit` fails (see the module docstring).
    The model must have been built and compiled (Adam or any Keras optimizer)
    under `workers.strategy.scope()`. It is trained on sparse cross-entropy on
    logits, as `compile_classifier` sets, or on `example_losses`; its metric
    is accuracy.

    Args:
        workers: See `Workers`.
        model: The compiled model.
        train: `(x, y, mask)` batches from `Workers.lockstep`.
        validation: The same, for validation.
        epochs: Index of the last epoch, as in `fit`.
        initial_epoch: As in `fit`. Defaults to `0`.
        callbacks: Keras callbacks, called at the beginning and end of training
            and of each epoch (not of each batch); `on_epoch_end` gets `loss`,
            `accuracy`, `val_loss` and `val_accuracy` over all workers'
            examples, and setting `model.stop_training` stops after the epoch.
            Defaults to `None`.
        class_weight: Optional `{label: weight}`, as in `fit`; it weighs the
            training loss only. Defaults to `None`.
        verbose: `0` for silence; otherwise one line per epoch.
            Defaults to `"auto"`.
        example_losses: Optional `(x, y, logits) -> {name: per-example
            losses}` (e.g. `Distiller.example_losses`): `"loss"` is minimized,
            every term is logged as its mean over the epoch's examples.
            Defaults to `None`: `{"loss": sparse cross-entropy on logits}`.

    Returns:
        A `keras.callbacks.History`: per epoch, `accuracy`, each loss term
        (`loss` first among them) and their `val_` counterparts, over all
        workers' examples (masked padding excluded).

    Raises:
        WorkerError: across machines, another worker stopped during an epoch.

    Example:

    On one machine, with the default strategy:

    >>> import numpy as np
    >>> from tftransfer.train import compile_classifier
    >>> from tftransfer.workers import Workers, make_strategy
    >>> workers = Workers.of(make_strategy("default"))
    >>> with workers.strategy.scope():
    ...     model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    ...     compile_classifier(model, 0.01)
    >>> pixels, labels = np.zeros((6, 4), "float32"), np.array([0, 1, 0, 1, 0, 1])
    >>> dataset = tf.data.Dataset.from_tensor_slices((pixels, labels)).batch(4)
    >>> batches = workers.lockstep(dataset, total=6, global_batch_size=4)
    >>> [tuple(part.shape) for part in next(iter(batches))]  # (x, y, mask)
    [(4, 4), (4,), (4,)]
    >>> history = distributed_fit(workers, model, batches, batches, epochs=2,
    ...                           verbose=0)
    >>> sorted(history.history), history.epoch
    (['accuracy', 'loss', 'val_accuracy', 'val_loss'], [0, 1])
    """
    loop = _OwnLoop(workers.strategy, model, class_weight, example_losses)
    history = keras.callbacks.History()
    callback_list = keras.callbacks.CallbackList(
        [*(callbacks or []), history], model=model, epochs=epochs
    )
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        callback_list.on_epoch_begin(epoch)
        start = time.perf_counter()
        try:
            logs, steps = loop.run_epoch(train, loop.train_step)
            # As in `fit`: `SwapEMAWeights` validates the weights' average.
            callback_list.on_test_begin()
            validation_logs, _ = loop.run_epoch(validation, loop.test_step)
            callback_list.on_test_end()
        except LOST_PEER_ERRORS as error:
            raise lost_worker(f"in epoch {epoch + 1}", error) from error
        logs.update({f"val_{name}": value for name, value in validation_logs.items()})
        if verbose != 0:
            print(f"Epoch {epoch + 1}/{epochs} - {steps} steps - "
                  f"{time.perf_counter() - start:.1f}s - "
                  + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()), flush=True)
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:  # e.g. EarlyStopping
            break
    callback_list.on_train_end()
    return history


class _OwnLoop:
    """The steps of `distributed_fit`: per-replica sums, all-reduced."""

    def __init__(self, strategy, model, class_weight, example_losses):
        self.strategy = strategy
        self.model = model
        self.optimizer = model.optimizer
        self.weights = None
        if class_weight:
            self.weights = tf.constant(
                [float(class_weight.get(i, 1.0))
                 for i in range(max(class_weight) + 1)], "float32")
        if example_losses is None:
            cross_entropy = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction=None)

            def example_losses(x, y, logits):
                return {"loss": cross_entropy(y, logits)}

        self.example_losses = example_losses
        self.names = []  # The loss terms' names, in order, once a step is traced.

    def sums(self, x, y, mask, training):
        """This replica's loss, and its sums of each term, of correct
        predictions and of examples: reduced over all replicas they give the
        means over the global batch."""
        model, names = self.model, self.names
        y = tf.cast(y, "int32")
        count = tf.distribute.get_replica_context().all_reduce("sum", tf.reduce_sum(mask))
        # Class weights weigh the training loss only, as in `fit`.
        scale = (mask if self.weights is None or not training
                 else mask * tf.gather(self.weights, y))
        logits = model(x, training=training)
        terms = self.example_losses(x, y, logits)
        names[:] = list(terms)
        term_sums = [tf.reduce_sum(tf.cast(terms[name], "float32") * scale)
                     for name in names]
        # The mean over the global batch, as Keras' "sum_over_batch_size".
        loss = term_sums[names.index("loss")] / tf.maximum(count, 1.0)
        if training and model.losses:
            # Regularization (e.g. a hub module's, or a Distiller's student's):
            # each replica adds its share, the gradients' all-reduce sums them.
            loss += tf.add_n([tf.cast(x, "float32") for x in model.losses]) / (
                self.strategy.num_replicas_in_sync)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type="int32"), y),
                          "float32")
        return loss, tf.stack([*term_sums, tf.reduce_sum(correct * mask),
                               tf.reduce_sum(mask)])

    def train_replica(self, x, y, mask):
        with tf.GradientTape() as tape:
            loss, totals = self.sums(x, y, mask, training=True)
            # Under mixed float16 the optimizer is a LossScaleOptimizer (Keras
            # wraps it in `compile`): it scales here and unscales in `apply`.
            scaled = self.optimizer.scale_loss(loss)
        variables = self.model.trainable_variables
        gradients = tape.gradient(scaled, variables)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            gradients = _agree_on_overflow(gradients)
        self.optimizer.apply(gradients, variables)
        return totals

    def test_replica(self, x, y, mask):
        return self.sums(x, y, mask, training=False)[1]

    @tf.function
    def train_step(self, batch):
        strategy = self.strategy
        return strategy.reduce("sum", strategy.run(self.train_replica, args=batch),
                               None)

    @tf.function
    def test_step(self, batch):
        strategy = self.strategy
        return strategy.reduce("sum", strategy.run(self.test_replica, args=batch),
                               None)

    def run_epoch(self, dataset, step):
        """`{name: mean}` of the loss terms and accuracy, and the step count."""
        totals, steps = 0.0, 0
        for batch in self.strategy.experimental_distribute_dataset(dataset):
            totals = totals + step(batch).numpy()  # Sized once `step` is traced.
            steps += 1
        if not steps:
            return {}, 0
        means = totals / max(totals[-1], 1.0)
        return {"accuracy": means[-2], **dict(zip(self.names, means))}, steps


def _agree_on_overflow(gradients):
    """Makes every replica's gradients non-finite when any replica's are.

    The LossScaleOptimizer skips a step when its replica's gradients overflow,
    judged before they are all-reduced: replicas could disagree, one skipping
    the all-reduce the others wait in.
    """
    overflow = tf.cast(tf.logical_not(tf.reduce_all(
        [tf.reduce_all(tf.math.is_finite(g)) for g in gradients
         if g is not None])), "float32")
    anywhere = tf.distribute.get_replica_context().all_reduce("sum", overflow) > 0
    return [None if g is None else
            g + tf.cast(tf.where(anywhere, float("nan"), 0.0), g.dtype)
            for g in gradients]

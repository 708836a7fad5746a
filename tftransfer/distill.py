"""Knowledge distillation: a student learns from a teacher's softened outputs.

`Distiller` follows the keras-io "Knowledge Distillation" example: a
`keras.Model` subclass whose `train_step` runs the frozen teacher outside the
gradient tape and the student inside it. Unlike `keras.distillation.Distiller`,
which runs the teacher on every batch of every epoch, it also accepts the
teacher's logits precomputed: `distill_run` computes them once per image (cached
on disk like backbone features), and when the student's backbone is frozen it
trains the student's head on cached features, so distilling a head costs one
forward pass of each network.
"""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

TEACHER_LOGITS = "teacher_logits"
INPUTS = "inputs"


# The reductions under which a Keras loss divides by the number of replicas.
MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def distillation_losses(teacher_logits, student_logits, temperature: float):
    """`KL(softmax(t/T) || softmax(s/T)) * T^2` for each example.

    The `T^2` factor keeps the soft targets' gradients on the same scale as the
    hard targets' when the temperature changes (Hinton et al., 2015). The KL
    divergence is Keras' (`keras.losses.KLDivergence`, with its clipping), so the
    value equals `keras.distillation.LogitsDistillation`'s.
    """
    teacher = keras.ops.softmax(
        keras.ops.cast(teacher_logits, "float32") / temperature, axis=-1
    )
    student = keras.ops.softmax(
        keras.ops.cast(student_logits, "float32") / temperature, axis=-1
    )
    divergence = keras.losses.KLDivergence(reduction=None)(teacher, student)
    return divergence * temperature**2


def distillation_loss(teacher_logits, student_logits, temperature: float,
                      sample_weight=None):
    """The soft-target distillation loss, averaged over the batch.

    Each example's loss is `KL(softmax(t / T) || softmax(s / T)) * T**2` (see
    `distillation_losses`); the `T**2` keeps its gradients on the scale of the
    hard-label loss's whatever the temperature. The sum over the batch is
    divided by the batch size, as Keras' `"sum_over_batch_size"` reduction does,
    and an empty batch gives 0, not NaN.

    Args:
        teacher_logits: The teacher's logits, `(batch, num_classes)`.
        student_logits: The student's logits, same shape.
        temperature: `T`, which softens both distributions; must be > 0.
        sample_weight: One weight per example, multiplying its divergence, or
            `None` for equal weights. Defaults to `None`.

    Returns:
        A float32 scalar tensor.

    Example:

    >>> import tftransfer
    >>> teacher_logits = [[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]]
    >>> student_logits = [[0.0, 0.0, 2.0], [2.0, 0.0, 0.0]]
    >>> loss = tftransfer.distillation_loss(teacher_logits, student_logits, 1.0)
    >>> round(float(loss), 4)
    0.6805
    >>> round(float(tftransfer.distillation_loss(
    ...     teacher_logits, student_logits, 1.0, sample_weight=[0.0, 1.0])), 4)
    0.0
    """
    divergence = distillation_losses(teacher_logits, student_logits, temperature)
    if sample_weight is not None:
        divergence = divergence * keras.ops.reshape(
            keras.ops.cast(sample_weight, "float32"), (-1,))
    count = keras.ops.cast(keras.ops.shape(divergence)[0], "float32")
    return keras.ops.divide_no_nan(keras.ops.sum(divergence), count)


class _FunctionLoss(keras.losses.Loss):
    """A per-example loss function as a Keras `Loss`: batch mean, sample weights."""

    def __init__(self, function):
        super().__init__(name="student_loss")
        self.function = function

    def call(self, y_true, y_pred):
        return self.function(y_true, y_pred)


@keras.saving.register_keras_serializable(package="tftransfer")
class Distiller(keras.Model):
    """Trains a student to match a frozen teacher's outputs and the labels.

    The loss is `w * student_loss(y, s) + (1 - w) * distillation_loss(t, s)`
    with `w = student_loss_weight`, `s` the student's logits, `t` the teacher's.
    The student's regularization losses are added while training.
    Gradients reach only the student's trainable weights; the teacher is called
    with `training=False` outside the gradient tape, and not at all when the
    batch carries its logits: `x` may be a dict `{"inputs": images,
    "teacher_logits": logits}`.

    It trains under a `tf.distribute` strategy's `scope()` as Keras' own
    losses do: each replica's batch-mean loss is divided by the number of
    replicas, whose gradients are summed. `sample_weight` (or `fit`'s
    `class_weight`) weighs both losses.

    Args:
        teacher: A `keras.Model` returning logits. It is frozen here (its
            `trainable` is set to `False`). May be `None` when every batch
            carries the teacher's logits.
        student: A `keras.Model` returning logits for the same classes.
        temperature: Softens both distributions; must be > 0. Defaults to
            `3.0`, as `keras.distillation.LogitsDistillation`'s.
        student_loss_weight: `w` above, between 0 and 1. Defaults to `0.5`,
            as `keras.distillation.Distiller`'s.
        **kwargs: Passed to `keras.Model` (e.g. `name`).

    Raises:
        ValueError: if `temperature` is not > 0 or `student_loss_weight` is not
            between 0 and 1; and, in `fit` or `evaluate`, when there is no
            teacher and a batch does not carry the teacher's logits.

    Example:

    >>> import keras, numpy as np, tftransfer
    >>> teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> distiller = tftransfer.Distiller(teacher, student, temperature=2.0)
    >>> distiller.compile(optimizer="adam")
    >>> x, y = np.ones((8, 4), "float32"), np.zeros((8,), "int32")
    >>> history = distiller.fit(x, y, epochs=1, verbose=0)
    >>> sorted(history.history)
    ['accuracy', 'distillation_loss', 'loss', 'student_loss']

    With the teacher's logits computed beforehand, no teacher is needed:

    >>> distiller = tftransfer.Distiller(None, student)
    >>> distiller.compile(optimizer="adam")
    >>> x = {"inputs": x, "teacher_logits": teacher.predict(x, verbose=0)}
    >>> history = distiller.fit(x, y, epochs=1, verbose=0)
    >>> distiller.predict(x, verbose=0).shape
    (8, 3)
    """

    def __init__(
        self,
        teacher: keras.Model,
        student: keras.Model,
        temperature: float = 3.0,
        student_loss_weight: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(
                f"`temperature` must be > 0. Received: temperature={temperature}"
            )
        if not 0.0 <= student_loss_weight <= 1.0:
            raise ValueError(
                "`student_loss_weight` must be between 0 and 1. "
                f"Received: student_loss_weight={student_loss_weight}"
            )
        self.teacher = teacher
        self.student = student
        if teacher is not None:
            self.teacher.trainable = False
        self.temperature = float(temperature)
        self.student_loss_weight = float(student_loss_weight)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.distillation_loss_tracker = keras.metrics.Mean(name="distillation_loss")

    def compile(self, optimizer="adam", student_loss=None, metrics=("accuracy",),
                **kwargs):
        """Configures training.

        Args:
            optimizer: A `keras.optimizers.Optimizer` or its name. Defaults to
                `"adam"`.
            student_loss: The hard-label loss: a `keras.losses.Loss`, or a
                function `(y_true, y_pred) -> per-example losses` (its batch
                mean is used). Defaults to sparse categorical cross-entropy on
                logits.
            metrics: Metrics of the student's predictions against the labels.
                Defaults to `("accuracy",)`.
        """
        student_loss = student_loss or keras.losses.SparseCategoricalCrossentropy(
            from_logits=True
        )
        if not isinstance(student_loss, keras.losses.Loss):
            student_loss = _FunctionLoss(keras.losses.get(student_loss))
        self.student_loss = student_loss
        super().compile(optimizer=optimizer, metrics=list(metrics or []), **kwargs)

    @property
    def metrics(self):
        # The default loss tracker is left out: ours reports the combined loss.
        compiled = [m for m in super().metrics if m.name != "loss"]
        return [self.loss_tracker, self.student_loss_tracker,
                self.distillation_loss_tracker, *compiled]

    def call(self, inputs, training=None):
        if isinstance(inputs, dict):
            inputs = inputs[INPUTS]
        return self.student(inputs, training=training)

    def _split(self, x):
        inputs, teacher_logits = (x[INPUTS], x.get(TEACHER_LOGITS)) if isinstance(
            x, dict) else (x, None)
        if teacher_logits is None:
            if self.teacher is None:
                raise ValueError(
                    "This Distiller has no teacher model, so each batch must carry "
                    f"the teacher's logits: x = {{'{INPUTS}': ..., "
                    f"'{TEACHER_LOGITS}': ...}}."
                )
            teacher_logits = self.teacher(inputs, training=False)
        return inputs, teacher_logits

    def _distillation_losses(self, y, student_logits, teacher_logits, sample_weight):
        """This replica's `(loss, student_loss, soft_loss)`, each a batch mean."""
        student_loss = self.student_loss(y, student_logits, sample_weight)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if self.student_loss.reduction in MEAN_REDUCTIONS and replicas > 1:
            # Under a tf.distribute strategy a Keras loss averaging over the
            # batch divides by the number of replicas too (for the sum of their
            # gradients); our soft loss does not, so the two combine undivided.
            student_loss = student_loss * replicas
        soft_loss = distillation_loss(teacher_logits, student_logits, self.temperature,
                                      sample_weight)
        loss = (self.student_loss_weight * student_loss
                + (1.0 - self.student_loss_weight) * soft_loss)
        return loss, student_loss, soft_loss

    def example_losses(self, x, y, student_logits) -> dict:
        """Each example's `loss`, `student_loss` and `distillation_loss`.

        What `train_step` averages over a batch, for training loops of one's
        own (`tftransfer.distribute.distributed_fit` takes it as
        `example_losses`). `x` is a batch as `fit` would get it.

        Raises:
            ValueError: `student_loss` reduces otherwise than by the batch
                mean (`"sum_over_batch_size"` or `"mean"`): a loop averaging
                per-example losses would train another objective than `fit`.
        """
        reduction = self.student_loss.reduction
        if reduction not in ("sum_over_batch_size", "mean"):
            raise ValueError(
                "A training loop of our own (distributed_fit) averages each "
                "example's loss over the batch, as a student_loss with reduction "
                "'sum_over_batch_size' does; this one has "
                f"reduction={reduction!r}. Compile the Distiller with a loss "
                "whose reduction is 'sum_over_batch_size'."
            )
        _, teacher_logits = self._split(x)
        # As `Loss.__call__` does before `call`: labels and logits in its dtype.
        dtype = self.student_loss.dtype
        student_loss = self.student_loss.call(
            keras.ops.convert_to_tensor(y, dtype=dtype),
            keras.ops.convert_to_tensor(student_logits, dtype=dtype))
        soft_loss = distillation_losses(keras.ops.stop_gradient(teacher_logits),
                                        student_logits, self.temperature)
        loss = (self.student_loss_weight * student_loss
                + (1.0 - self.student_loss_weight) * soft_loss)
        return {"loss": loss, "student_loss": student_loss,
                "distillation_loss": soft_loss}

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # The teacher runs here, outside the tape: no gradient can reach it.
        inputs, teacher_logits = self._split(x)
        teacher_logits = tf.stop_gradient(teacher_logits)
        with tf.GradientTape() as tape:
            student_logits = self.student(inputs, training=True)
            loss, student_loss, soft_loss = self._distillation_losses(
                y, student_logits, teacher_logits, sample_weight)
            objective = loss
            if self.student.losses:
                # Regularization (`kernel_regularizer`s, a hub module's), as
                # Keras' own `compute_loss` adds it.
                objective = loss + tf.add_n(
                    [tf.cast(term, "float32") for term in self.student.losses])
            # The replicas' gradients are summed, so each replica's mean loss is
            # divided by their number, as Keras' own losses are.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            # Under mixed precision a LossScaleOptimizer scales the loss here and
            # unscales the gradients in `apply`; otherwise this is the identity.
            scaled_loss = self.optimizer.scale_loss(objective / replicas)
        variables = self.student.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(gradients, variables)
        return self._update_metrics(x, y, student_logits, sample_weight, loss,
                                    student_loss, soft_loss)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        inputs, teacher_logits = self._split(x)
        student_logits = self.student(inputs, training=False)
        loss, student_loss, soft_loss = self._distillation_losses(
            y, student_logits, teacher_logits, sample_weight)
        return self._update_metrics(x, y, student_logits, sample_weight, loss,
                                    student_loss, soft_loss)

    def _update_metrics(self, x, y, student_logits, sample_weight, loss,
                        student_loss, soft_loss):
        # Weighed by batch size, as Keras' own loss tracker: under a strategy a
        # replica's share of a last, short batch may be smaller, or empty.
        size = keras.ops.cast(keras.ops.shape(student_logits)[0], "float32")
        self.loss_tracker.update_state(loss, sample_weight=size)
        self.student_loss_tracker.update_state(student_loss, sample_weight=size)
        self.distillation_loss_tracker.update_state(soft_loss, sample_weight=size)
        return self.compute_metrics(x, y, student_logits, sample_weight)

    def get_config(self):
        return {
            **super().get_config(),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            "temperature": self.temperature,
            "student_loss_weight": self.student_loss_weight,
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects: Optional[dict] = None):
        config = dict(config)
        for name in ("teacher", "student"):
            config[name] = keras.saving.deserialize_keras_object(
                config[name], custom_objects=custom_objects
            )
        return cls(**config)

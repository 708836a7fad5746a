"""Classification heads and the classifier that joins a backbone to one."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import keras
import tensorflow as tf

STANDARDIZE = "standardize"  # The head's `Normalization` layer, if any.


def build_head(
    num_features: int, num_classes: int, dropout: float = 0.2,
    standardize: bool = False,
) -> keras.Model:
    """Builds a classification head from pooled features to logits.

    The head is its own model so that it can be trained alone on cached features
    and then used, with the same weights, inside the full classifier. Its layers
    compute in float32 whatever the global dtype policy, so that logits and the
    softmax stay accurate under mixed precision.

    Args:
        num_features: Size of the feature vectors the head takes.
        num_classes: Number of classes (logits) it returns.
        dropout: Dropout rate applied to the features while training.
            Defaults to `0.2`.
        standardize: Start with a `Normalization` layer named
            `"standardize"`, an identity until adapted: the engine adapts it
            to the training features (a cut backbone's middle features differ
            in scale from channel to channel by orders of magnitude, and a
            head on them learnt in 5 epochs what a standardised one learnt in
            1). Defaults to `False`.

    Returns:
        A `keras.Sequential` named `"head"`: (with `standardize`, the
        `Normalization` layer), `Dropout`, then a `Dense` layer, mapping
        `(batch, num_features)` to logits `(batch, num_classes)`.

    Raises:
        ValueError: if `num_classes` is less than 2 or `dropout` is not in
            [0, 1).

    Example:

    >>> import tftransfer
    >>> head = tftransfer.build_head(num_features=512, num_classes=3)
    >>> head.input_shape, head.output_shape
    ((None, 512), (None, 3))
    >>> [layer.compute_dtype for layer in head.layers]
    ['float32', 'float32']
    """
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be at least 2. Received: {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
    standardizing = ([keras.layers.Normalization(axis=-1, dtype="float32",
                                                 name=STANDARDIZE)]
                     if standardize else [])
    return keras.Sequential(
        [
            keras.Input((num_features,), name="features"),
            *standardizing,
            keras.layers.Dropout(dropout, dtype="float32", name="dropout"),
            keras.layers.Dense(num_classes, dtype="float32", name="logits"),
        ],
        name="head",
    )


def build_classifier(
    backbone: keras.Model, num_classes: int, dropout: float = 0.2,
    standardize: bool = False,
) -> keras.Model:
    """Joins a backbone and a new classification head (from `build_head`).

    The backbone is used as given, not copied and not frozen here: a backbone
    from `load_backbone` is already frozen, so only the head trains until it is
    unfrozen (see `unfreeze_top`).

    Args:
        backbone: A model from `load_backbone`: pixels in 0..255 to features
            `(batch, features)`.
        num_classes: Number of classes.
        dropout: Dropout rate applied to the features before the last layer.
            Defaults to `0.2`.
        standardize: The head standardises its features (see `build_head`);
            `train --cut` asks for it. Defaults to `False`.

    Returns:
        A `keras.Model` named `"classifier"` with layers `pixels`, `backbone` and
        `head`, that takes float pixels in 0..255 of the backbone's input shape
        and returns logits `(batch, num_classes)`. The backbone is called with
        `training=False`, so its BatchNorm layers stay in inference mode even
        when fine-tuned.

    Raises:
        ValueError: if `num_classes` is less than 2 or `dropout` is not in
            [0, 1).

    Example:

    >>> import tftransfer
    >>> backbone = tftransfer.load_backbone("vgg16", weights=None, image_size=32)
    >>> model = tftransfer.build_classifier(backbone, num_classes=3)
    >>> model.input_shape, model.output_shape
    ((None, 32, 32, 3), (None, 3))
    >>> [layer.name for layer in model.layers]
    ['pixels', 'backbone', 'head']
    >>> len(model.trainable_weights)  # The head's kernel and bias.
    2
    """
    head = build_head(backbone.output_shape[-1], num_classes, dropout, standardize)
    inputs = keras.Input(backbone.input_shape[1:], name="pixels")
    features = backbone(inputs, training=False)
    return keras.Model(inputs, head(features), name="classifier")


def plain_copy(model: keras.Model, network: keras.Model, dropout: float) -> keras.Model:
    """The trained classifier rebuilt outside any strategy, for saving.

    `network` is a new backbone built as the model's was (its weights are
    replaced), `dropout` the head's.

    A model built under a strategy holds distributed variables; saving a plain
    copy keeps the exported files free of them, and keeps the chief's saving
    free of collective ops the other workers would have to join.
    """
    standardize = any(layer.name == STANDARDIZE
                      for layer in model.get_layer("head").layers)
    copy = build_classifier(network, int(model.outputs[0].shape[-1]), dropout,
                            standardize)
    # Built the same way and frozen the same way, the two list their weights
    # in the same order (names may differ: Keras numbers repeated layer names).
    if [tuple(v.shape) for v in copy.weights] != [tuple(v.shape) for v in model.weights]:
        raise RuntimeError("The classifier cannot be rebuilt for saving: its "
                           "weights differ from a freshly built one's.")
    from tftransfer.checkpoint import refresh_normalization

    for target, source in zip(copy.weights, model.weights):
        target.assign(source.numpy())
    refresh_normalization(copy)
    return copy


def inference(model) -> Callable:
    """`model` called in inference mode, as one traced function.

    For passes over many batches: called eagerly, Keras dispatches each layer
    anew for every batch, which doubled the time of a run's final
    predictions (2.4 s against 1.2 s, tracing included, for 1,000
    activations through MobileNet's top). Batch shapes are relaxed after the
    second, so a short last batch traces once more at most. One function per
    model, kept while the model lives: a greedy soup scores its candidates
    through one model whose weights it assigns in place, and traces once.
    """
    forward = _INFERENCE.get(model)
    if forward is None:
        # Through a weak reference: a function holding the model would keep
        # its own key, and the model, alive for good.
        held = weakref.ref(model)
        forward = tf.function(lambda inputs: held()(inputs, training=False),
                              reduce_retracing=True)
        _INFERENCE[model] = forward
    return forward


_INFERENCE = weakref.WeakKeyDictionary()


def evaluate_classifier(model: keras.Model, dataset) -> tuple:
    """Loss and accuracy of `model` on `(pixels, label)` batches.

    Not `model.evaluate`, which needs `compile`, and a compiled model would be
    saved to `model.keras` with an optimizer it never used.
    """
    loss = keras.metrics.Mean()
    accuracy = keras.metrics.SparseCategoricalAccuracy()
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None
    )
    forward = inference(model)
    for pixels, labels in dataset:
        logits = forward(pixels)
        loss.update_state(cross_entropy(labels, logits))
        accuracy.update_state(labels, logits)
    return float(loss.result()), float(accuracy.result())

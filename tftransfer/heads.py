"""Classification heads and the classifier that joins a backbone to one."""

from __future__ import annotations

import keras


def build_head(
    num_features: int, num_classes: int, dropout: float = 0.2
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

    Returns:
        A `keras.Sequential` named `"head"`.
    """
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be at least 2. Received: {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
    return keras.Sequential(
        [
            keras.Input((num_features,), name="features"),
            keras.layers.Dropout(dropout, dtype="float32", name="dropout"),
            keras.layers.Dense(num_classes, dtype="float32", name="logits"),
        ],
        name="head",
    )


def build_classifier(
    backbone: keras.Model, num_classes: int, dropout: float = 0.2
) -> keras.Model:
    """Joins a frozen backbone and a new classification head.

    Args:
        backbone: A model from `load_backbone`: pixels in 0..255 to features.
        num_classes: Number of classes.
        dropout: Dropout rate before the last layer. Defaults to `0.2`.

    Returns:
        A `keras.Model` named `"classifier"` that takes float pixels in 0..255 of
        the backbone's input shape and returns logits `(batch, num_classes)`. The
        backbone is called with `training=False`, so its BatchNorm layers stay in
        inference mode even when fine-tuned.

    Example:

    >>> from tftransfer import load_backbone
    >>> backbone = load_backbone("mobilenet_v2", weights=None, image_size=96, alpha=0.35)
    >>> model = build_classifier(backbone, num_classes=3)
    >>> model.output_shape
    (None, 3)
    """
    head = build_head(backbone.output_shape[-1], num_classes, dropout)
    inputs = keras.Input(backbone.input_shape[1:], name="pixels")
    features = backbone(inputs, training=False)
    return keras.Model(inputs, head(features), name="classifier")

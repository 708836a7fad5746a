"""A backbone's graph: the network inside it, its layers, and where it can be cut.

Fine-tuning unfreezes the top layers of `backbone_network(backbone)`;
`split_backbone` finds where its graph can be cut at one tensor below them, so
that the frozen bottom's output for each image can be computed once.
"""

from __future__ import annotations

import functools
from typing import Optional

import keras

from tftransfer.backbones import get_backbone_spec


def backbone_network(backbone: keras.Model) -> keras.Model:
    """Returns the Keras Applications network nested inside a `load_backbone` model."""
    for layer in backbone.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError(
        "Expected a backbone made by `load_backbone`, with a nested network. "
        f"Received: a model named {backbone.name!r} without one"
    )


def split_backbone(backbone: keras.Model, num_layers: int) -> Optional[tuple]:
    """Cuts a backbone into a bottom and a top holding its top `num_layers` layers.

    Fine-tuning only the top of a backbone leaves the bottom's output for each
    image unchanged, so it can be computed once. The cut must cross the graph at
    a single tensor: when a residual branch jumps over the first unfrozen layer,
    the cut moves down until it does not, keeping every unfrozen layer in the top.

    Args:
        backbone: A model from `load_backbone`.
        num_layers: Layers of its network that must be in the top.

    Returns:
        `(bottom, top)` models sharing the backbone's layers: `bottom` takes the
        backbone's pixels and `top(bottom(x))` equals `backbone(x)`; or `None`
        when no single-tensor cut exists (or `backbone` is a hub module).

    Example:

    >>> import numpy as np
    >>> from tftransfer.backbones import load_backbone
    >>> backbone = load_backbone("mobilenet_v2", weights=None, image_size=32,
    ...                          alpha=0.35)
    >>> bottom, top = split_backbone(backbone, num_layers=10)
    >>> bottom.output_shape, top.output_shape
    ((None, 1, 1, 336), (None, 1280))
    >>> pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3))
    >>> pixels = pixels.astype("float32")
    >>> bool(np.allclose(top(bottom(pixels)), backbone(pixels), atol=1e-4))
    True
    """
    if not any(isinstance(layer, keras.Model) for layer in backbone.layers):
        return None  # A hub module is one opaque layer: nothing to cut.
    network = backbone_network(backbone)
    layers = network.layers
    producer = {}
    for index, layer in enumerate(layers):
        for tensor in keras.tree.flatten(layer.output):
            producer[id(tensor)] = index
    for cut in range(len(layers) - num_layers, 0, -1):
        boundary = {}
        for layer in layers[cut:]:
            for tensor in keras.tree.flatten(layer.input):
                if producer.get(id(tensor), -1) < cut:
                    boundary[id(tensor)] = tensor
        if len(boundary) == 1:
            (tensor,) = boundary.values()
            if tensor is network.inputs[0]:
                return None
            bottom_network = keras.Model(network.inputs[0], tensor)
            top = keras.Model(tensor, network.outputs[0], name="backbone_top")
            inputs = keras.Input(backbone.inputs[0].shape[1:], name="pixels")
            x = inputs
            for layer in backbone.layers[1:]:
                x = bottom_network(x) if layer is network else layer(x)
            bottom = keras.Model(inputs, x, name="backbone_bottom")
            return bottom, top
    return None


# Layers of each Keras Applications network as `load_backbone` builds it
# (pooling included), the same for every `alpha`: building the larger ones only
# to count them takes seconds, and a setting must be checked at once.
# tests/test_backbones.py checks every entry against a real build.
NUM_LAYERS = {
    "ConvNeXtTiny": 134, "DenseNet121": 428, "EfficientNetB0": 238,
    "EfficientNetB1": 340, "EfficientNetB2": 340, "EfficientNetB3": 385,
    "EfficientNetV2B0": 271, "EfficientNetV2S": 514, "InceptionV3": 312,
    "MobileNet": 87, "MobileNetV2": 155, "MobileNetV3Large": 188,
    "MobileNetV3Small": 158, "ResNet101": 346, "ResNet50": 176,
    "ResNet50V2": 191, "VGG16": 20, "VGG19": 23, "Xception": 133,
}


@functools.cache
def count_network_layers(name: str, alpha: Optional[float] = None) -> int:
    """How many layers the network of backbone `name` has: what `unfreeze_top`
    counts, and so the most `fine_tune_layers` can be.

    Known networks are looked up in `NUM_LAYERS`; others are built from their
    architecture alone (no weights), which can take seconds.

    Args:
        name: A registered backbone name.
        alpha: The width multiplier, if any. Defaults to `None`.

    Returns:
        The number of layers.

    Example:

    >>> count_network_layers("vgg16")
    20
    """
    spec = get_backbone_spec(name)
    if spec.constructor in NUM_LAYERS:
        return NUM_LAYERS[spec.constructor]
    size = max(spec.min_image_size, 32)
    kwargs = {"alpha": alpha} if alpha is not None else {}
    constructor = getattr(keras.applications, spec.constructor)
    network = constructor(include_top=False, weights=None, pooling="avg",
                          input_shape=(size, size, 3), **kwargs)
    return len(network.layers)

"""Filter pruning: narrower convolutions in the top of a chain backbone.

`prune_filters` removes the output filters of smallest L1 norm from the
convolutions among a backbone's top layers (the block `unfreeze_top` unfreezes)
and rebuilds the network with fewer channels, its surviving weights copied in:
unlike a mask of zeros (magnitude pruning), the smaller network does less work.

Only chains can be narrowed this way: where a residual `Add`, a `Concatenate`
or a squeeze-excite `Multiply` joins two branches, both must keep the same
channels, which pruning each convolution by its own norms does not give.
"""

from __future__ import annotations

import collections
import math
from typing import Optional

import keras
import numpy as np

from tftransfer.graph import backbone_network

CHAIN_NETWORKS = "VGG16, VGG19, MobileNet"
_MAGNITUDE = ("use magnitude pruning (`--prune`, `fine_tune(prune=...)`), which "
              "needs no chain")

# Layers that treat each channel on its own, so that dropping a channel before
# them drops the same channel after them (with its per-channel weights, if any).
_CHANNELWISE_LAYERS = (
    keras.layers.BatchNormalization,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.Activation,
    keras.layers.ZeroPadding2D,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
)


def prune_filters(
    backbone: keras.Model, fraction: float, num_layers: int
) -> tuple[keras.Model, list[dict]]:
    """Removes the weakest filters of the convolutions in a backbone's top layers.

    Each `Conv2D` among the top `num_layers` layers of the backbone's network
    (counted as `unfreeze_top` counts them) loses `fraction` of its output
    filters, those whose kernels have the smallest L1 norm. The channels they
    made are dropped all the way to the next `Conv2D`: from the
    BatchNormalization layers and depthwise convolutions between (whose
    channels follow), and from the next convolution's input channels.

    The last `Conv2D` of the network keeps its filters, so the backbone's
    feature width is unchanged: classifier heads built for it and feature
    caches of that width stay valid.

    The backbone is not changed; the result is a new model with the same layer
    names, input and output shapes, and trainable flags, holding the kept
    weights. Train it for a few epochs to recover what the removed filters did.

    Args:
        backbone: A model from `load_backbone` (the preprocessing is kept and
            the nested network replaced), or a Keras Applications network.
            Its top `num_layers` layers must form a chain: each layer has one
            input and one consumer, as in VGG16, VGG19 and MobileNet.
        fraction: Share of each convolution's filters to remove, between 0 and
            1 (exclusive), rounded down per layer; every layer keeps one
            filter at least.
        num_layers: How many of the network's top layers to prune, between 1
            and the number of its layers.

    Returns:
        `(pruned, removed)`: the pruned model, and one dict per convolution
        whose output channels changed, in order, `{"layer": name,
        "filters_before": int, "filters_after": int}` (for a depthwise
        convolution, its channels).

    Raises:
        TypeError: `backbone` is not a Keras model, or `fraction` or
            `num_layers` is not a number.
        ValueError: `fraction` is not between 0 and 1; `num_layers` is out of
            range or holds no convolution to prune; the top layers are not a
            chain (the message names the layers that join or split branches,
            or that filter pruning cannot narrow); or `backbone` is a hub
            module (one opaque layer) or a model built on a backbone (a
            classifier).

    Example:

    >>> import numpy as np
    >>> from tftransfer.backbones import load_backbone
    >>> backbone = load_backbone("mobilenet", weights=None, image_size=32,
    ...                          alpha=0.25)
    >>> pruned, removed = prune_filters(backbone, fraction=0.5, num_layers=26)
    >>> removed[0]
    {'layer': 'conv_pw_10', 'filters_before': 128, 'filters_after': 64}
    >>> [row["layer"] for row in removed[1:]]
    ['conv_dw_11', 'conv_pw_11', 'conv_dw_12', 'conv_pw_12', 'conv_dw_13']
    >>> pruned.output_shape  # The last convolution, conv_pw_13, keeps its 256.
    (None, 256)
    >>> pruned.count_params() < backbone.count_params()
    True
    >>> pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3))
    >>> pruned(pixels.astype("float32"), training=False).shape
    TensorShape([2, 256])
    """
    _check_arguments(backbone, fraction, num_layers)
    nested = any(isinstance(layer, keras.Model) for layer in backbone.layers)
    network = backbone_network(backbone) if nested else backbone
    layers = network.layers
    inner = [layer.name for layer in layers if isinstance(layer, keras.Model)]
    if inner:
        raise ValueError(
            "`backbone` must be a model from `load_backbone` or a Keras "
            f"Applications network, not a model built on one: {backbone.name!r} "
            f"holds {network.name!r}, which holds the model {inner[0]!r}. Pass "
            f"the backbone itself (e.g. model.get_layer({network.name!r})). "
            f"Received: backbone={backbone.name!r}"
        )
    if num_layers > len(layers):
        raise ValueError(
            f"`num_layers` must be between 1 and {len(layers)} for {network.name}. "
            f"Received: num_layers={num_layers}"
        )
    top = layers[len(layers) - num_layers:]
    _check_chain(network, top)
    plan = _plan(top, fraction)
    if not any(isinstance(layer, keras.layers.Conv2D) and plan[layer.name][1]
               is not None for layer in top):
        raise ValueError(
            f"The top {num_layers} layers of {network.name} hold no convolution "
            "to prune: the last convolution of the network keeps its filters. "
            f"Prune more layers. Received: num_layers={num_layers}"
        )
    pruned_network = _rebuild(network, plan)
    if nested:
        pruned = _clone(backbone, {network.name: pruned_network}, {}, {})
    else:
        pruned = pruned_network
    _copy_trainable(backbone, pruned)
    return pruned, _removed(top, plan)


def _check_arguments(backbone, fraction, num_layers) -> None:
    from tftransfer.hub import hub_layer

    if not isinstance(backbone, keras.Model):
        raise TypeError(
            "`backbone` must be a keras.Model (from `load_backbone`, or a Keras "
            f"Applications network). Received: backbone of type "
            f"{type(backbone).__name__}"
        )
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"`fraction` must be a number. Received: fraction={fraction!r}")
    if not 0 < fraction < 1:
        raise ValueError(
            "`fraction` must be between 0 and 1 (exclusive): the share of each "
            f"convolution's filters to remove. Received: fraction={fraction!r}"
        )
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise TypeError(
            f"`num_layers` must be an integer. Received: num_layers={num_layers!r}"
        )
    if num_layers < 1:
        raise ValueError(
            f"`num_layers` must be at least 1. Received: num_layers={num_layers}"
        )
    module = hub_layer(backbone)
    if module is not None:
        raise ValueError(
            f"prune_filters supports chains of convolutions ({CHAIN_NETWORKS}); "
            f"the hub module {module.handle} is one opaque layer, whose "
            "convolutions cannot be rebuilt. Received: a hub backbone"
        )


def _problem(layer, consumers) -> Optional[str]:
    """Why filter pruning cannot pass through `layer`, or `None`."""
    kind = type(layer).__name__
    inputs = keras.tree.flatten(layer.input)
    if len(inputs) > 1:
        return f"`{layer.name}` ({kind}) joins {len(inputs)} branches"
    outputs = keras.tree.flatten(layer.output)
    uses = max(consumers[id(tensor)] for tensor in outputs)
    if uses > 1 or len(outputs) > 1:
        return f"`{layer.name}` ({kind}) feeds {max(uses, len(outputs))} branches"
    config = layer.get_config()
    if config.get("data_format") == "channels_first":
        return f"`{layer.name}` ({kind}) is channels_first"
    if isinstance(layer, keras.layers.Conv2D):
        if config.get("groups", 1) != 1:
            return f"`{layer.name}` ({kind}) has groups={config['groups']}"
        return None
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        if config["depth_multiplier"] != 1:
            return (f"`{layer.name}` ({kind}) has "
                    f"depth_multiplier={config['depth_multiplier']}")
        return None
    if isinstance(layer, keras.layers.BatchNormalization):
        if keras.tree.flatten(config["axis"]) not in ([-1], [len(outputs[0].shape) - 1]):
            return f"`{layer.name}` ({kind}) normalizes axis {config['axis']}"
        return None
    if isinstance(layer, keras.layers.Activation) and config["activation"] in (
            "softmax", "log_softmax"):
        return f"`{layer.name}` ({kind}) mixes channels ({config['activation']})"
    if isinstance(layer, _CHANNELWISE_LAYERS):
        return None
    return f"`{layer.name}` ({kind}) is not a layer filter pruning can narrow"


def _check_chain(network: keras.Model, top: list) -> None:
    consumers = collections.Counter()
    for layer in network.layers:
        if not isinstance(layer, keras.layers.InputLayer):
            for tensor in keras.tree.flatten(layer.input):
                consumers[id(tensor)] += 1
    problems = {index: _problem(layer, consumers) for index, layer in enumerate(top)
                if not isinstance(layer, keras.layers.InputLayer)}
    problems = {index: problem for index, problem in problems.items() if problem}
    if not problems:
        return
    # Joins first: they are why residual networks are refused.
    shown = sorted(problems.values(), key=lambda problem: "joins" not in problem)
    shown = ", ".join(shown[:3]) + (
        f" and {len(problems) - 3} more" if len(problems) > 3 else "")
    # The layers above the highest problem are a chain: worth pruning if they
    # hold a convolution besides the last one.
    chain = top[max(problems) + 1:]
    if sum(isinstance(layer, keras.layers.Conv2D) for layer in chain) > 1:
        fix = (f"Prune at most its top {len(chain)} layers, choose a chain network, "
               f"or {_MAGNITUDE}.")
    else:
        fix = f"Choose a chain network, or {_MAGNITUDE}."
    raise ValueError(
        f"prune_filters supports chains of convolutions ({CHAIN_NETWORKS}); in "
        f"the top {len(top)} layers of {network.name}, {shown}. {fix} "
        f"Received: num_layers={len(top)}"
    )


def _strongest_filters(kernel: np.ndarray, fraction: float) -> np.ndarray:
    """Indices, in order, of the output filters that survive pruning."""
    norms = np.abs(kernel).sum(axis=(0, 1, 2))
    # A tolerance, so that 0.29 of 100 filters removes 29, not 28.
    removed = min(math.floor(fraction * len(norms) + 1e-9), len(norms) - 1)
    return np.sort(np.argsort(norms, kind="stable")[removed:])


def _plan(top: list, fraction: float) -> dict:
    """`{layer name: (kept input channels, kept output channels)}` over the top.

    `None` keeps all channels. The top is a chain, so each layer takes the
    output of the one before it.
    """
    convolutions = [layer for layer in top if isinstance(layer, keras.layers.Conv2D)]
    plan = {}
    channels = None
    for layer in top:
        kept_in = channels
        if isinstance(layer, keras.layers.Conv2D):
            last = layer is convolutions[-1]
            channels = None if last else _strongest_filters(
                keras.ops.convert_to_numpy(layer.kernel), fraction)
        plan[layer.name] = (kept_in, channels)
    return plan


def _sliced_weights(layer, kept_in, kept_out) -> list:
    weights = layer.get_weights()

    def take(array, kept, axis):
        return array if kept is None else np.take(array, kept, axis=axis)

    if isinstance(layer, keras.layers.Conv2D):
        kernel = take(take(weights[0], kept_in, 2), kept_out, 3)
        return [kernel] + [take(bias, kept_out, 0) for bias in weights[1:]]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return [take(weights[0], kept_in, 2)] + [take(bias, kept_in, 0)
                                                 for bias in weights[1:]]
    # BatchNormalization: gamma, beta and moving statistics, one per channel.
    return [take(weight, kept_in, 0) for weight in weights]


def _clone(model: keras.Model, replacements: dict, filters: dict,
           weights: dict) -> keras.Model:
    """A copy of `model`: layers swapped in by name, some `filters` changed,
    and each layer's weights taken from `weights` by name, or from `model`."""

    def clone_layer(layer):
        if layer.name in replacements:
            return replacements[layer.name]
        config = layer.get_config()
        if layer.name in filters:
            config["filters"] = filters[layer.name]
        return layer.__class__.from_config(config)

    # A fresh input of the same name: clone_model would name it after its
    # tensor. Keras Applications networks and backbones have one input, first.
    (tensor,) = model.inputs
    inputs = keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype,
                         name=model.layers[0].name)
    copy = keras.models.clone_model(model, input_tensors=inputs,
                                    clone_function=clone_layer)
    for layer in model.layers:
        if layer.name not in replacements:
            copy.get_layer(layer.name).set_weights(
                weights.get(layer.name) or layer.get_weights())
    return copy


def _rebuild(network: keras.Model, plan: dict) -> keras.Model:
    filters, weights = {}, {}
    for name, (kept_in, kept_out) in plan.items():
        layer = network.get_layer(name)
        if isinstance(layer, keras.layers.Conv2D) and kept_out is not None:
            filters[name] = len(kept_out)
        if layer.weights:
            weights[name] = _sliced_weights(layer, kept_in, kept_out)
    return _clone(network, {}, filters, weights)


def _copy_trainable(source: keras.Model, target: keras.Model) -> None:
    # Setting a model's flag sets its layers' too: parents first, then children.
    target.trainable = source.trainable
    for layer in source.layers:
        copy = target.get_layer(layer.name)
        if isinstance(layer, keras.Model):
            _copy_trainable(layer, copy)
        else:
            copy.trainable = layer.trainable


def _removed(top: list, plan: dict) -> list:
    rows = []
    for layer in top:
        kept_in, kept_out = plan[layer.name]
        if isinstance(layer, keras.layers.Conv2D) and kept_out is not None:
            rows.append({"layer": layer.name, "filters_before": layer.filters,
                         "filters_after": len(kept_out)})
        elif isinstance(layer, keras.layers.DepthwiseConv2D) and kept_in is not None:
            rows.append({"layer": layer.name,
                         "filters_before": int(layer.kernel.shape[2]),
                         "filters_after": len(kept_in)})
    return rows


def refit_pruned_filters(backbone: keras.Model, pruned: keras.Model, fraction: float,
                         num_layers: int, images, seed: int = 0) -> Optional[list]:
    """Refits `prune_filters`' narrowed convolutions to the backbone's outputs.

    A convolution that lost input channels (the filters removed below it)
    computes its kept outputs from less: its weights are refitted by least
    squares so that those outputs match the unpruned backbone's on `images`
    (`reconstruct`; ThiNet, Luo et al. 2017, and He et al. 2017 do this for
    the same reason). Without it, half of MobileNet 0.75's unfrozen filters
    removed cost cats_and_dogs 0.07 of test accuracy after fine-tuning.

    Args:
        backbone: The backbone `prune_filters` was given (from `load_backbone`).
        pruned: What it returned; refitted in place.
        fraction: The `fraction` it was given.
        num_layers: The `num_layers` it was given.
        images: A batch of training images for `backbone` (a few hundred).
        seed: Chooses the positions fitted on. Defaults to `0`.

    Returns:
        One dict per refitted convolution, `{"layer", "relative_error_before",
        "relative_error_after"}`, or `None` when nothing can be refitted (a
        network that cannot be cut below its top, or whose narrowed
        convolutions are not all pointwise, such as VGG16's 3x3).

    Example:

    >>> import numpy as np
    >>> from tftransfer.backbones import load_backbone
    >>> backbone = load_backbone("mobilenet", weights=None, image_size=32,
    ...                          alpha=0.25)
    >>> pruned, _ = prune_filters(backbone, fraction=0.5, num_layers=26)
    >>> pixels = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3))
    >>> record = refit_pruned_filters(backbone, pruned, 0.5, 26,
    ...                               pixels.astype("float32"))
    >>> [row["layer"] for row in record]
    ['conv_pw_11', 'conv_pw_12', 'conv_pw_13']
    >>> all(row["relative_error_after"] < row["relative_error_before"]
    ...     for row in record)
    True
    """
    from tftransfer.graph import split_backbone
    from tftransfer.reconstruction import DenseTargets, reconstruct, reconstructable

    dense, narrow = split_backbone(backbone, num_layers), split_backbone(pruned,
                                                                        num_layers)
    if dense is None or narrow is None:
        return None
    plan = _plan(backbone_network(backbone).layers[-num_layers:], fraction)
    names = [name for name, (kept_in, _) in plan.items()
             if kept_in is not None and isinstance(dense[1].get_layer(name),
                                                    keras.layers.Conv2D)]
    layers = [dense[1].get_layer(name) for name in names]
    if not layers or not all(reconstructable(layer) for layer in layers):
        return None
    activations = dense[0].predict(images, batch_size=32, verbose=0)
    targets = DenseTargets(dense[1], layers, activations, seed=seed)
    errors = reconstruct(targets, network=narrow[1],
                         layers=[narrow[1].get_layer(name) for name in names],
                         outputs=[plan[name][1] for name in names])
    return [{"layer": name, "relative_error_before": round(before, 4),
             "relative_error_after": round(after, 4)}
            for name, (before, after) in zip(names, errors)]

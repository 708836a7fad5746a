"""Discriminative learning rates for fine-tuning (ULMFiT, fastai's `slice`).

Lower layers of a pretrained network hold more general features and should
move less: with `lr_decay=F`, the head and the top block of the unfrozen
backbone learn at the fine-tuning rate, the block below at `F` times it, the
next at `F**2` times, and so on. Keras' `MultiOptimizer` applies one Adam per
block; its `OptimizerMap` names each block's variables by their exact paths,
so the optimizer is saved and loaded with the model.

A block is what the backbone's layer names number: `block_16_*`
(MobileNetV2), `conv_dw_13*`/`conv_pw_13*` (MobileNet), `conv5_block3_*`
(ResNet), `block7a_*` (EfficientNet), `block5_conv3` (VGG, one per
convolution; so are Xception's separable convolutions and InceptionV3's
`conv2d_N`, where `F` therefore applies per layer). Layers named without a
number (`top_conv`, `out_relu`) form their own block where they stand.
"""

from __future__ import annotations

import re

import keras

_NUMBERS = re.compile(r"\d+[a-z]?(?=_|$)")


def block_key(layer_name: str) -> tuple:
    """The block a layer belongs to: the first two numbers in its name.

    Example:

    >>> block_key("block_16_expand_BN"), block_key("conv_pw_13_relu")
    (('16',), ('13',))
    >>> block_key("conv5_block3_2_conv"), block_key("top_conv")
    (('5', '3'), ('top_conv',))
    """
    numbers = tuple(_NUMBERS.findall(layer_name)[:2])
    return numbers or (layer_name,)


def unfrozen_blocks(network: keras.Model) -> list:
    """The trainable layers holding weights, grouped in blocks, top block first.

    Returns:
        A list of blocks, each a list of layers.
    """
    blocks, last = [], None
    for layer in reversed(network.layers):
        if not (layer.trainable and layer.trainable_weights):
            continue
        key = block_key(layer.name)
        if key != last:
            blocks.append([])
            last = key
        blocks[-1].append(layer)
    return blocks


def discriminative_optimizer(network: keras.Model, learning_rate: float,
                             lr_decay: float,
                             warmup_steps: int = 0,
                             ema: float = 0.0) -> keras.optimizers.Optimizer:
    """Adam at `learning_rate` for everything but the lower unfrozen blocks of
    `network`, which get `learning_rate * lr_decay**depth`.

    Args:
        network: The backbone's network, its top unfrozen (`unfreeze_top`).
        learning_rate: The top block's (and the head's) rate.
        lr_decay: Each lower block's factor, in (0, 1]. `1`: a plain Adam.
        warmup_steps: Each rate rises linearly from 0 over this many steps
            (`linear_warmup`). Defaults to `0`.
        ema: Each Adam keeps an exponential moving average of its weights
            with this momentum (`use_ema`), `0` for none. Defaults to `0`.

    Returns:
        A `keras.optimizers.MultiOptimizer`, or an `Adam` when `lr_decay`
        is 1 or the network has a single unfrozen block.

    Example:

    >>> from tftransfer import load_backbone
    >>> from tftransfer.graph import backbone_network
    >>> from tftransfer.train import unfreeze_top
    >>> backbone = load_backbone("vgg16", weights=None, image_size=32)
    >>> unfreeze_top(backbone, 5)
    3
    >>> network = backbone_network(backbone)
    >>> optimizer = discriminative_optimizer(network, 1e-3, 0.5)
    >>> sorted(round(float(o.learning_rate), 8) for o in optimizer.optimizers)
    [0.00025, 0.0005, 0.001]
    """
    from tftransfer.train import warm_adam

    blocks = unfrozen_blocks(network)
    if lr_decay == 1 or len(blocks) < 2:
        return warm_adam(learning_rate, warmup_steps, ema)
    optimizers = {}
    for depth, layers in enumerate(blocks[1:], start=1):
        paths = "|".join(re.escape(v.path) for layer in layers
                         for v in layer.trainable_weights)
        optimizers[f"(?:{paths})"] = warm_adam(
            learning_rate * lr_decay ** depth, warmup_steps, ema,
            name=f"adam_block_{depth}")
    default = warm_adam(learning_rate, warmup_steps, ema, name="adam_top")
    return keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(default, optimizers))

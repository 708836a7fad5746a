"""Keras Applications backbones: a registry and a loader for frozen feature extractors.

A backbone here is a `keras.Model` that takes float pixels in 0..255 at its image
size, applies its own `preprocess_input` inside, and returns one pooled feature
vector per image. Its Keras Applications network is nested inside it as one layer,
so the top of that network can be unfrozen for fine-tuning.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Optional, Union

import keras

from tftransfer.errors import WeightsUnavailableError, check_choice

PREPROCESSING_MODES = ("tf", "caffe", "torch", "unit", "none")
HUB_PREFIX = "hub:"


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one Keras Applications backbone.

    A frozen dataclass; pass it to `register_backbone` to make its name known to
    `load_backbone` and the command line.

    Args:
        name: Registry name (`"mobilenet_v2"`); `register_backbone` stores it
            lowercase with `-` as `_`.
        constructor: Name of the `keras.applications` function (`"MobileNetV2"`).
        preprocessing: How pixels in 0..255 are scaled before the network, one of
            `PREPROCESSING_MODES`: `"tf"` (to -1..1), `"caffe"` (BGR, ImageNet mean
            subtracted), `"torch"` (0..1, ImageNet mean and std), `"unit"` (0..1),
            or `"none"` (the network preprocesses inside itself).
        default_image_size: Image side the ImageNet weights were trained at.
            Defaults to `224`.
        min_image_size: Smallest side the architecture accepts. Defaults to `32`.
        has_alpha: Whether the constructor takes a width multiplier `alpha`.
            Defaults to `False`.

    Example:

    >>> spec = get_backbone_spec("xception")
    >>> spec.constructor, spec.preprocessing, spec.default_image_size
    ('Xception', 'tf', 299)
    >>> BackboneSpec("my_vgg", "VGG16", "caffe")  # doctest: +NORMALIZE_WHITESPACE
    BackboneSpec(name='my_vgg', constructor='VGG16', preprocessing='caffe',
                 default_image_size=224, min_image_size=32, has_alpha=False)
    """

    name: str
    constructor: str
    preprocessing: str
    default_image_size: int = 224
    min_image_size: int = 32
    has_alpha: bool = False


_REGISTRY: dict[str, BackboneSpec] = {}


def _registry_key(name: str) -> str:
    # Registration and lookup must agree, so "MyNet", "mynet" and "my-net" style
    # variants all reach one entry.
    return name.lower().replace("-", "_")


def register_backbone(spec: BackboneSpec, *, overwrite: bool = False) -> BackboneSpec:
    """Adds a backbone to the registry, so every name-taking function knows it.

    The name is stored normalized (lowercase, `-` as `_`), as
    `get_backbone_spec` looks names up, so any capitalization finds it.

    Args:
        spec: The `BackboneSpec` to register.
        overwrite: Replace a backbone already registered under the same name.
            Defaults to `False`.

    Returns:
        The registered spec, its `name` normalized.

    Raises:
        TypeError: `spec` is not a `BackboneSpec`.
        ValueError: the name is empty, starts with `hub:`, or is already
            registered (and `overwrite` is `False`); or `spec.preprocessing` is
            not one of `PREPROCESSING_MODES`.

    Example:

    >>> spec = register_backbone(BackboneSpec("Tiny-MobileNet", "MobileNetV2", "tf",
    ...                                       default_image_size=32, has_alpha=True))
    >>> spec.name
    'tiny_mobilenet'
    >>> get_backbone_spec("TINY_MOBILENET") is spec
    True
    >>> load_backbone("Tiny-MobileNet", weights=None, alpha=0.35).output_shape
    (None, 1280)
    >>> del _REGISTRY["tiny_mobilenet"]  # Undo the example's registration.
    """
    if not isinstance(spec, BackboneSpec):
        raise TypeError(
            f"`spec` must be a BackboneSpec. Received: spec={spec!r} "
            f"of type {type(spec).__name__}"
        )
    check_choice("preprocessing", spec.preprocessing, PREPROCESSING_MODES)
    key = _registry_key(spec.name)
    if not key or key.startswith(HUB_PREFIX):
        raise ValueError(
            "`spec.name` must be a non-empty name not starting with 'hub:' (hub "
            f"handles need no registration). Received: name={spec.name!r}"
        )
    if key in _REGISTRY and not overwrite:
        raise ValueError(
            f"A backbone named {key!r} is already registered "
            f"({_REGISTRY[key].constructor or 'no constructor'}). Register it under "
            "another name, or pass `overwrite=True` to replace it. "
            f"Received: name={spec.name!r}"
        )
    spec = dataclasses.replace(spec, name=key)
    _REGISTRY[key] = spec
    return spec


for _spec in (
    BackboneSpec("vgg16", "VGG16", "caffe"),
    BackboneSpec("vgg19", "VGG19", "caffe"),
    BackboneSpec("resnet50", "ResNet50", "caffe"),
    BackboneSpec("resnet101", "ResNet101", "caffe"),
    BackboneSpec("resnet50_v2", "ResNet50V2", "tf"),
    BackboneSpec("mobilenet", "MobileNet", "tf", has_alpha=True),
    BackboneSpec("mobilenet_v2", "MobileNetV2", "tf", has_alpha=True),
    BackboneSpec("mobilenet_v3_small", "MobileNetV3Small", "none", has_alpha=True),
    BackboneSpec("mobilenet_v3_large", "MobileNetV3Large", "none", has_alpha=True),
    BackboneSpec("efficientnet_b0", "EfficientNetB0", "none", 224),
    BackboneSpec("efficientnet_b1", "EfficientNetB1", "none", 240),
    BackboneSpec("efficientnet_b2", "EfficientNetB2", "none", 260),
    BackboneSpec("efficientnet_b3", "EfficientNetB3", "none", 300),
    BackboneSpec("efficientnet_v2_b0", "EfficientNetV2B0", "none", 224),
    BackboneSpec("efficientnet_v2_s", "EfficientNetV2S", "none", 384),
    BackboneSpec("densenet121", "DenseNet121", "torch"),
    BackboneSpec("xception", "Xception", "tf", 299, min_image_size=71),
    BackboneSpec("inception_v3", "InceptionV3", "tf", 299, min_image_size=75),
    BackboneSpec("convnext_tiny", "ConvNeXtTiny", "none"),
):
    register_backbone(_spec)


def backbone_names() -> list[str]:
    """Returns the registered backbone names, sorted.

    `hub:HANDLE` names are accepted too but are not listed: they need no
    registration.

    Returns:
        A list of names, each accepted by `load_backbone` and `get_backbone_spec`.

    Example:

    >>> names = backbone_names()
    >>> names[:3]
    ['convnext_tiny', 'densenet121', 'efficientnet_b0']
    >>> "mobilenet_v2" in names
    True
    """
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    """Returns the `BackboneSpec` registered as `name`.

    `hub:HANDLE` names (TF-Hub / Kaggle Models URLs or local SavedModel folders,
    see `tftransfer.hub`) get a spec of their own: images in [0, 1], 224 px by
    default.

    Args:
        name: A registered name, in any case, `-` or `_` alike; or `hub:HANDLE`.

    Returns:
        The `BackboneSpec`.

    Raises:
        ValueError: if `name` is not registered (the message lists the valid
            names), or is `hub:` without a handle.

    Example:

    >>> get_backbone_spec("MobileNet-V2")  # doctest: +NORMALIZE_WHITESPACE
    BackboneSpec(name='mobilenet_v2', constructor='MobileNetV2', preprocessing='tf',
                 default_image_size=224, min_image_size=32, has_alpha=True)
    >>> get_backbone_spec("hub:/models/my_saved_model").preprocessing
    'unit'
    """
    if name.startswith(HUB_PREFIX):
        if len(name) == len(HUB_PREFIX):
            raise ValueError("`hub:` needs a handle: hub:https://... or hub:/path")
        return BackboneSpec(name, "", "unit", default_image_size=224)
    key = _registry_key(name)
    if key not in _REGISTRY:
        raise ValueError(
            f"Unknown backbone {name!r}. Expected one of: {', '.join(backbone_names())}"
            ", or hub:HANDLE (a TF-Hub / Kaggle Models URL or a SavedModel folder)."
        )
    return _REGISTRY[key]


@keras.saving.register_keras_serializable(package="tftransfer")
class ImagePreprocessing(keras.layers.Layer):
    """Scales float pixels in 0..255 the way a backbone's weights expect.

    The first layer of every `load_backbone` model, so that callers always feed
    pixels in 0..255 whatever the network was trained on.

    Args:
        mode: One of `PREPROCESSING_MODES` (see `BackboneSpec`). Defaults to
            `"tf"`.
        **kwargs: Passed to `keras.layers.Layer` (e.g. `name`).

    Raises:
        ValueError: `mode` is not one of `PREPROCESSING_MODES`.

    Example:

    >>> pixels = keras.ops.convert_to_tensor([[0.0, 127.5, 255.0]])
    >>> keras.ops.convert_to_numpy(ImagePreprocessing("tf")(pixels)).tolist()
    [[-1.0, 0.0, 1.0]]
    >>> keras.ops.convert_to_numpy(ImagePreprocessing("unit")(pixels)).tolist()
    [[0.0, 0.5, 1.0]]
    """

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        check_choice("mode", mode, PREPROCESSING_MODES)
        self.mode = mode

    def call(self, inputs):
        inputs = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "none":
            return inputs
        if self.mode == "unit":
            return inputs / 255.0
        # Keras' own implementation of the three ImageNet conventions.
        return keras.applications.imagenet_utils.preprocess_input(
            inputs, mode=self.mode
        )

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def _keras_models_dir() -> str:
    # Keras fixes its home folder when it is imported and has no public accessor
    # for it; use its private one when present so the message names the folder
    # Keras really searched.
    try:
        from keras.src.backend.config import keras_home
    except ImportError:
        home = os.environ.get("KERAS_HOME") or os.path.expanduser("~/.keras")
    else:
        home = keras_home()
    return os.path.join(home, "models")


def load_backbone(
    name: str,
    weights: Optional[Union[str, os.PathLike]] = "imagenet",
    image_size: Optional[int] = None,
    alpha: Optional[float] = None,
) -> keras.Model:
    """Loads a Keras Applications network as a frozen feature extractor.

    Args:
        name: A registered backbone name; see `backbone_names()`.
        weights: `"imagenet"`, `None` (random initialization), or the path of a
            weights file for the network without its top (as written by
            `save_weights`). Defaults to `"imagenet"`.
        image_size: Side of the square input images. Defaults to the backbone's
            `default_image_size`.
        alpha: Width multiplier, for the MobileNet family only. Defaults to `None`
            (the constructor's default, 1.0).

    Returns:
        A frozen `keras.Model` named `"backbone"` mapping float pixels in 0..255 of
        shape `(batch, image_size, image_size, 3)` to pooled features of shape
        `(batch, features)`. Call it with `training=False`.

    Raises:
        ValueError: for an unknown name, an out-of-range size or a misplaced `alpha`.
        WeightsUnavailableError: when ImageNet weights can be neither found in
            `$KERAS_HOME/models` nor downloaded.

    Example:

    >>> import numpy as np
    >>> backbone = load_backbone("mobilenet_v2", weights=None, image_size=32, alpha=0.35)
    >>> backbone.output_shape
    (None, 1280)
    >>> pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3))
    >>> backbone(pixels.astype("float32"), training=False).shape
    TensorShape([2, 1280])

    With ImageNet weights, found in `$KERAS_HOME/models` or downloaded:

    >>> backbone = load_backbone("mobilenet_v2", alpha=0.35)  # doctest: +SKIP
    """
    spec = get_backbone_spec(name)
    image_size = int(image_size or spec.default_image_size)
    weights = check_backbone_options(spec, image_size, alpha, weights)
    if spec.name.startswith(HUB_PREFIX):
        from tftransfer.hub import load_hub_backbone

        return load_hub_backbone(spec.name[len(HUB_PREFIX):], image_size)
    kwargs = {} if alpha is None else {"alpha": float(alpha)}
    constructor = getattr(keras.applications, spec.constructor)

    def build(size, weights):
        return construct_loaded(
            constructor,
            include_top=False,
            weights=weights,
            input_shape=(size, size, 3),
            pooling="avg",
            **kwargs,
        )

    try:
        network = build(image_size, weights)
    except Exception as error:  # Keras raises a bare Exception on download failure.
        missing = _offline_error(spec, weights, error)
        if image_size == spec.default_image_size:
            raise missing from None
        # Some families (MobileNet, MobileNetV2) have one weights file per input
        # size. Without network access, the default size's file, if present, has
        # the same shapes (the network is fully convolutional without its top),
        # as Keras itself uses for sizes it has no file for.
        try:
            reference = build(spec.default_image_size, weights)
        except Exception:
            raise missing from None
        network = build(image_size, None)
        network.set_weights(reference.get_weights())
        warnings.warn(
            f"No ImageNet weights file for {spec.name} at {image_size} px could be "
            f"had ({missing.file_name}); using the {spec.default_image_size} px "
            "weights, which have the same shapes.",
            stacklevel=2,
        )
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    features = ImagePreprocessing(spec.preprocessing, name="preprocessing")(inputs)
    features = network(features)
    backbone = keras.Model(inputs, features, name="backbone")
    backbone.trainable = False
    return backbone


def construct_loaded(constructor, **kwargs) -> keras.Model:
    """`constructor(**kwargs)`, each variable created holding the value its
    weights file gives it.

    A Keras Applications constructor creates every variable with its random
    initializer, then overwrites it from the weights file: for MobileNetV2
    0.35 that is 0.3-0.4 s of 0.9-1.5 s (260 variables, each drawn then
    assigned). Built in a `keras.StatelessScope`, the variables wait
    uninitialized and the file's values are collected as the scope's
    updates; each variable is then created from its value, or from its
    initializer if the file had none (random weights). Keras has no public
    switch for this: it uses Keras' own deferred initialization
    (`initialize_all_variables`, a variable's `_initializer`), and builds
    as Keras does where those are missing.
    """
    try:
        from keras.src.backend.common.stateless_scope import in_stateless_scope
        from keras.src.backend.common.variables import initialize_all_variables
    except ImportError:
        return constructor(**kwargs)
    if in_stateless_scope():  # Variables cannot be initialized inside one.
        return constructor(**kwargs)
    try:
        with keras.StatelessScope(initialize_variables=False) as scope:
            network = constructor(**kwargs)
        for variable in network.variables:
            value = scope.get_current_value(variable)
            if value is not None:
                variable._initializer = lambda shape, dtype, value=value: value
    finally:  # Even a failed build's variables, which would linger otherwise.
        initialize_all_variables()
    return network


def _offline_error(spec, weights, error) -> WeightsUnavailableError:
    """The clear error for a failed weights download; re-raises anything else."""
    match = re.search(r"URL fetch failure on (\S+):", str(error))
    if weights != "imagenet" or not match:
        raise error
    url = match.group(1)
    file_name = url.rsplit("/", 1)[-1]
    missing = WeightsUnavailableError(
        f"ImageNet weights for {spec.name} could not be downloaded ({url}).\n"
        f"Keras looks for the file {file_name} in {_keras_models_dir()} "
        f"(set KERAS_HOME to use another folder). To fix it, either:\n"
        f"  - put {file_name} there (copy it from a machine with network access),\n"
        f"  - train from random weights: --weights none (weights=None),\n"
        f"  - or give a weights file: --weights PATH (weights='PATH')."
    )
    missing.file_name = file_name
    return missing


def check_backbone_options(spec: BackboneSpec, image_size: Optional[int],
                           alpha: Optional[float], weights) -> Optional[str]:
    """Checks what `load_backbone` is given, without building anything.

    Returns:
        `weights`, with `"none"` as `None`.

    Raises:
        ValueError: `alpha` for a network without it, an image smaller than
            the network takes, or a weights file that does not exist.
    """
    if spec.name.startswith(HUB_PREFIX):  # Weights and size are the module's.
        if alpha is not None:
            raise ValueError(f"`alpha` does not apply to hub backbones. "
                             f"Received: alpha={alpha}")
        return weights
    if alpha is not None and not spec.has_alpha:
        raise ValueError(
            f"`alpha` applies to the MobileNet family only, not {spec.name}. "
            f"Received: alpha={alpha}"
        )
    if image_size is not None and image_size < spec.min_image_size:
        raise ValueError(
            f"`image_size` must be at least {spec.min_image_size} for {spec.name}. "
            f"Received: image_size={image_size}"
        )
    if weights is None or weights == "imagenet":
        return weights
    if isinstance(weights, str) and weights.lower() == "none":
        return None
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise ValueError(
            "`weights` must be 'imagenet', None, or the path of an existing weights "
            f"file. Received: weights={weights!r} (no such file)"
        )
    return path

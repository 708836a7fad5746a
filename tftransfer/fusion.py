"""Feature fusion (融合): several backbones' pooled features in one head.

`--backbone mobilenet:alpha=0.75,mobilenet_v2:alpha=0.35` builds one backbone
(named `"backbone"`, as `load_backbone`'s) that takes pixels at the largest
member's size, resizes them for each smaller member, runs each member (a
`load_backbone` model, named `member_0`, `member_1`, ...), and joins their
pooled features in a `fusion` sub-model: each member's vector scaled to unit
length, then to the square root of the mean width, so that every member
counts the same whatever the scale or width of its features, and
concatenated. The classifier, its head and its exports are a single
backbone's: the SavedModel decodes each image once.

The engine computes each member's features through the cache under the same
key a single-backbone run of that member uses (see `Engine.head_data`): after
the single runs, a fusion computes no backbone pass at all. Fine-tuning
unfreezes the top of each member and trains on the images.

Members are given as `NAME` or `NAME:key=value[:key=value]`, keys `alpha`,
`size` and `weights`, separated by commas; `hub:` handles too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional, Union

import keras

from tftransfer.backbones import (
    HUB_PREFIX,
    check_backbone_options,
    get_backbone_spec,
    load_backbone,
)
from tftransfer.settings import is_fusion, safe_name

MEMBER_KEYS = ("alpha", "size", "weights")
FUSION_LAYER = "fusion"
MEMBER_PREFIX = "member_"


@dataclasses.dataclass(frozen=True)
class Member:
    """One backbone of a fusion.

    Args:
        name: A registered backbone name or `hub:HANDLE`.
        alpha: Width multiplier (MobileNet family), or `None`.
        image_size: Side the member runs at, or `None`: the run's
            `image_size`, else the backbone's default.
        weights: `"imagenet"`, `"none"` or a weights file, or `None`: the
            run's `weights`.
    """

    name: str
    alpha: Optional[float] = None
    image_size: Optional[int] = None
    weights: Optional[str] = None

    def __str__(self) -> str:
        text = self.name
        if self.alpha is not None:
            text += f":alpha={self.alpha:g}"
        if self.image_size is not None:
            text += f":size={self.image_size}"
        if self.weights is not None:
            text += f":weights={self.weights}"
        return text


def parse_backbones(text: str, image_size: Optional[int] = None) -> list:
    """The `Member`s of a `--backbone a,b` value, checked and normalised.

    Args:
        text: Members separated by commas, each `NAME` or
            `NAME:key=value[:key=value]` with keys `alpha`, `size`, `weights`.
        image_size: The run's image side, given to members without `size=`.
            Defaults to `None`: each backbone's default.

    Returns:
        A list of at least two `Member`s, names as registered and every
        `image_size` filled in.

    Raises:
        ValueError: fewer than two members, an empty one, an unknown key or
            backbone, or an option the backbone does not take.

    Example:

    >>> members = parse_backbones("MobileNet:alpha=0.75,mobilenet_v2:alpha=0.35")
    >>> [str(member) for member in members]
    ['mobilenet:alpha=0.75:size=224', 'mobilenet_v2:alpha=0.35:size=224']
    >>> parse_backbones("vgg16,hub:https://example.com/model:size=96")[1].name
    'hub:https://example.com/model'
    >>> parse_backbones("vgg16,vgg16:depth=3")
    Traceback (most recent call last):
    ...
    ValueError: Unknown option 'depth' in backbone member 'vgg16:depth=3'. Expected NAME or NAME:key=value[:key=value] with keys alpha, size, weights.
    """
    parts = [part.strip() for part in text.split(",")]
    if len(parts) < 2 or not all(parts):
        raise ValueError(
            "A fusion needs at least two backbones separated by commas, none "
            f"empty: NAME[:key=value],NAME[:key=value]. Received: {text!r}")
    members = []
    for part in parts:
        name, options = split_member(part)
        spec = get_backbone_spec(name)
        alpha = options.get("alpha")
        size = options.get("size") or image_size or spec.default_image_size
        weights = options.get("weights")
        check_backbone_options(spec, size, alpha, weights)
        members.append(Member(spec.name, alpha, size, weights))
    return members


def split_member(part: str) -> tuple:
    """`(name, options)` of one `NAME[:key=value]...` member: `key=value`
    pieces taken from the end (a hub handle's URL holds colons of its own).

    Example:

    >>> split_member("mobilenet:alpha=0.75:size=160")
    ('mobilenet', {'size': 160, 'alpha': 0.75})
    """
    pieces = part.split(":")
    options = {}
    while len(pieces) > 1 and "=" in pieces[-1]:
        key, _, value = pieces[-1].partition("=")
        if key not in MEMBER_KEYS:
            if part.startswith(HUB_PREFIX):
                break  # A URL's own query string.
            raise ValueError(
                f"Unknown option {key!r} in backbone member {part!r}. Expected NAME "
                "or NAME:key=value[:key=value] with keys " + ", ".join(MEMBER_KEYS)
                + ".")
        try:
            options[key] = {"alpha": float, "size": int, "weights": str}[key](value)
        except ValueError:
            raise ValueError(f"`{key}` of backbone member {part!r} must be a "
                             f"{'number' if key == 'alpha' else 'whole number'}. "
                             f"Received: {value!r}") from None
        pieces.pop()
    return ":".join(pieces), options


def format_backbones(members: Sequence[Member]) -> str:
    """The canonical `--backbone` value of `members` (what a resume compares)."""
    return ",".join(str(member) for member in members)


def fusion_name(members: Sequence[Member]) -> str:
    """A short name for run folders: the members' folder-safe names joined
    by `+`."""
    return "+".join(safe_name(member.name) for member in members)


def fusion_image_size(members: Sequence[Member]) -> int:
    """The side a fusion's pixels come in at: its largest member's."""
    return max(member.image_size for member in members)


def load_members(members: Sequence[Member], weights="imagenet",
                 seed: Optional[int] = None) -> list:
    """`load_backbone` for each member, a member's own `weights` first.

    With `seed`, the random state is reset before each member, so a member
    built from random weights gets the weights a single run of it with that
    seed gets (and shares its cached features).
    """
    backbones = []
    for member in members:
        if seed is not None:
            keras.utils.set_random_seed(seed)
        own = member.weights if member.weights is not None else weights
        backbones.append(load_backbone(member.name, own, member.image_size,
                                       member.alpha))
    return backbones


def build_fusion(widths: Sequence[int]) -> keras.Model:
    """The `fusion` sub-model: member features, each normalised, concatenated.

    Each member's vector is scaled to unit length (`UnitNormalization`) and
    then by the square root of the members' mean width, so that every member
    weighs the same in the head and the joined vector's elements have a mean
    square of one, the scale the head's learning rate suits. Built-in Keras
    layers only, in float32: `model.keras` loads without tftransfer.
    """
    scale = math.sqrt(sum(widths) / len(widths))
    inputs = [keras.Input((int(width),), name=f"features_{index}")
              for index, width in enumerate(widths)]
    normalised = [
        keras.layers.Rescaling(scale, dtype="float32", name=f"scale_{index}")(
            keras.layers.UnitNormalization(dtype="float32", name=f"unit_{index}")(x))
        for index, x in enumerate(inputs)]
    joined = keras.layers.Concatenate(dtype="float32", name="concatenate")(normalised)
    return keras.Model(inputs, joined, name=FUSION_LAYER)


def build_fused_backbone(backbones: Sequence[keras.Model],
                         image_size: Optional[int] = None) -> keras.Model:
    """Joins `load_backbone` models into one frozen backbone.

    Args:
        backbones: At least two models from `load_backbone` (renamed
            `member_0`, `member_1`, ... here).
        image_size: Side of the fused backbone's pixels. Defaults to the
            largest member's; smaller members get a `Resizing` layer.

    Returns:
        A frozen `keras.Model` named `"backbone"`, pixels in 0..255 to the
        joined features (see `build_fusion`): `build_classifier` takes it
        as any backbone.

    Example:

    >>> from tftransfer import load_backbone
    >>> members = [load_backbone("mobilenet_v2", None, 32, alpha=0.35),
    ...            load_backbone("vgg16", None, 48)]
    >>> fused = build_fused_backbone(members)
    >>> fused.input_shape, fused.output_shape
    ((None, 48, 48, 3), (None, 1792))
    >>> [layer.name for layer in fused.layers]
    ['pixels', 'resize_0', 'member_0', 'member_1', 'fusion']
    """
    backbones = list(backbones)
    if len(backbones) < 2:
        raise ValueError(f"A fusion needs at least two backbones. Received: "
                         f"{len(backbones)}")
    sizes = [int(backbone.input_shape[1]) for backbone in backbones]
    side = int(image_size or max(sizes))
    inputs = keras.Input((side, side, 3), name="pixels")
    features = []
    for index, (backbone, size) in enumerate(zip(backbones, sizes)):
        backbone.name = f"{MEMBER_PREFIX}{index}"
        pixels = inputs
        if size != side:  # As `decode_image` resizes: bilinear, no antialiasing.
            pixels = keras.layers.Resizing(size, size, interpolation="bilinear",
                                           name=f"resize_{index}")(inputs)
        features.append(backbone(pixels, training=False))
    fusion = build_fusion([backbone.output_shape[-1] for backbone in backbones])
    fused = keras.Model(inputs, fusion(features), name="backbone")
    fused.trainable = False
    return fused


def fused_members(backbone: keras.Model) -> Optional[list]:
    """The member backbones of a fused backbone, in order; `None` for one
    that is not fused."""
    if not any(layer.name == FUSION_LAYER and isinstance(layer, keras.Model)
               for layer in backbone.layers):
        return None
    return [layer for layer in backbone.layers
            if isinstance(layer, keras.Model) and layer.name.startswith(MEMBER_PREFIX)]


def member_path(backbone: keras.Model, index: int) -> keras.Model:
    """Member `index` on the fused backbone's pixels (its resize, if any)."""
    member = fused_members(backbone)[index]
    names = {layer.name for layer in backbone.layers}
    if f"resize_{index}" not in names:
        return member
    return keras.Sequential([keras.Input(backbone.input_shape[1:]),
                             backbone.get_layer(f"resize_{index}"), member],
                            name=f"path_{index}")


def build_fused_classifier(backbones: Sequence[Union[str, keras.Model, Member]],
                           num_classes: int, dropout: float = 0.2,
                           weights="imagenet", image_size: Optional[int] = None
                           ) -> keras.Model:
    """A classifier over several backbones' features (feature fusion).

    Args:
        backbones: `load_backbone` models, or member names in `--backbone`'s
            form (`"mobilenet:alpha=0.75"`), or `Member`s.
        num_classes: Number of classes.
        dropout: The head's dropout. Defaults to `0.2`.
        weights: Weights of members named without their own. Defaults to
            `"imagenet"`.
        image_size: Side of members named without `size=`. Defaults to each
            backbone's default.

    Returns:
        A `build_classifier` model whose `backbone` is `build_fused_backbone`'s:
        `fine_tune` and every export take it as a single backbone's.

    Example:

    >>> model = build_fused_classifier(["mobilenet_v2:alpha=0.35", "vgg16"], 3,
    ...                                weights=None, image_size=32)
    >>> model.input_shape, model.output_shape
    ((None, 32, 32, 3), (None, 3))
    >>> model.get_layer("head").input_shape
    (None, 1792)
    """
    from tftransfer.heads import build_classifier

    models = []
    for backbone in backbones:
        if isinstance(backbone, keras.Model):
            models.append(backbone)
            continue
        member = backbone
        if not isinstance(member, Member):
            name, options = split_member(str(backbone))
            member = Member(get_backbone_spec(name).name, options.get("alpha"),
                            options.get("size") or image_size, options.get("weights"))
        models += load_members([member], weights)
    return build_classifier(build_fused_backbone(models), num_classes, dropout)


def build_backbone(config, image_size: int, weights="config") -> keras.Model:
    """The backbone a run's settings name: `load_backbone`'s, or a fusion's.

    Args:
        config: A `RunConfig` (its `network`, `weights`, `alpha`, `seed`).
        image_size: The side the run's pixels come at.
        weights: Defaults to `"config"`: the settings'. `None` builds it
            from random weights (a copy to assign trained weights to).
    """
    weights = config.weights if weights == "config" else weights
    if not is_fusion(config.network):
        return load_backbone(config.network, weights, image_size, config.alpha)
    members = parse_backbones(config.network)
    if weights is None:  # Every member's own weights too.
        members = [dataclasses.replace(member, weights="none") for member in members]
    return build_fused_backbone(load_members(members, weights, seed=config.seed),
                                image_size)

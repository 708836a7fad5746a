"""The settings of a run, in one place: Python's config classes and the CLI's flags.

`RunConfig` holds what `train` and `distill` share; `TrainConfig` and
`DistillConfig` add their own fields. Each field carries its help text and
command-line form in its metadata, and `add_arguments` / `from_arguments`
build the `argparse` options from them (as Hugging Face's `HfArgumentParser`
does), so the command line and Python cannot drift apart.

Every value is checked when the config is made, before any scan, download or
model build.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Optional

from tftransfer.errors import check_choice

HEAD_LEARNING_RATE = 1e-2
FINE_TUNE_LEARNING_RATE = 1e-4
# Of the first fine-tuning epoch: see `linear_warmup` (benchmarks/RESULTS.md).
FINE_TUNE_WARMUP = 0.3
# Momentum of the average of the fine-tuned weights (Polyak averaging).
FINE_TUNE_EMA = 0.95
PRECISIONS = ("auto", "off", "float16", "bfloat16")
JIT_SETTINGS = ("auto", "on", "off")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
# LiteRT (TFLite) files: see tftransfer.tflite and tftransfer.tflite_check.
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
CALIBRATION_IMAGES = 200
MAX_ACCURACY_DROP = 0.02
# `--cut auto`: the cross-validated accuracy a shallower cut may lose.
CUT_TOLERANCE = 0.01
# The exported signatures refuse an image whose header declares more pixels
# (tftransfer.image_headers): above any camera's frame (24 MP is 6000x4000),
# and a few hundred MB at most for the decoder.
MAX_SERVING_PIXELS = 40_000_000


def setting(default=dataclasses.MISSING, help: str = "", *, flag: Optional[str] = None,
            metavar: Optional[str] = None, choices=None, cli_type=None,
            positional: bool = False, required: bool = False, short=None,
            resumable: bool = True, cli: bool = True, kw_only: bool = True):
    """A config field with its command-line form.

    Args:
        default: The default value.
        help: Help text; the CLI adds "(default: ...)".
        flag: The option's name. Defaults to `--` plus the field name with
            dashes. For a boolean defaulting to `True`, e.g. `--no-cache`.
        metavar: Shown for the value in `--help`.
        choices: The allowed values.
        cli_type: Converts the command line's string.
        positional: A positional argument rather than an option.
        required: A required option.
        short: A one-letter alias, e.g. `"-o"`.
        resumable: Part of what must not change for a killed run to resume.
        cli: Offered on the command line.
        kw_only: Keyword-only in the config's constructor.
    """
    metadata = dict(help=help, flag=flag, metavar=metavar, choices=choices,
                    cli_type=cli_type, positional=positional, required=required,
                    short=short, resumable=resumable, cli=cli)
    return dataclasses.field(default=default, metadata=metadata, kw_only=kw_only)


def _weights(value: str):
    return None if value.lower() == "none" else value


def _rate(value: str):
    return "auto" if value.strip().lower() == "auto" else float(value)


_rate.__name__ = "learning rate (a number or auto)"  # For argparse's message.


def _class_weight(value: str):
    return None if value.lower() == "none" else value


@dataclasses.dataclass
class RunConfig:
    """Settings `train` and `distill` share; see `TrainConfig` and `DistillConfig`.

    Not made itself: its subclasses add the network that trains. Each field's
    help and command-line form are in its metadata; `check` runs on
    construction, before any scan, download or model build. Without
    `output`, the run folder is `saved_models/<data folder>-<network>`.

    Example:

    >>> import dataclasses, tempfile
    >>> from tftransfer.demo import write_demo_images
    >>> [field.name for field in dataclasses.fields(RunConfig)][:5]
    ['data_dir', 'output', 'alpha', 'weights', 'image_size']
    >>> data = write_demo_images(tempfile.mkdtemp(), images_per_class=4,
    ...                          image_size=32)
    >>> config = TrainConfig(data, backbone="vgg16", weights=None)
    >>> isinstance(config, RunConfig), config.network, config.batch_size
    (True, 'vgg16', 32)
    >>> config.output == os.path.join(
    ...     "saved_models", os.path.basename(data) + "-vgg16")
    True
    >>> TrainConfig(data, backbone="vgg16", epochs=0)
    Traceback (most recent call last):
    ...
    ValueError: Nothing to train: `epochs` and `fine_tune_epochs` are both 0. Received: epochs=0, fine_tune_epochs=0
    """

    data_dir: str = setting(
        help="folder of class folders, or of train/ and val/ (or test/) folders "
             "holding them", positional=True, metavar="DATA_DIR", kw_only=False)
    output: Optional[str] = setting(
        None, "run folder (default: saved_models/<data>-<backbone>; for distill, "
        "saved_models/<data>-distilled-<student>)",
        metavar="RUN_DIR", short="-o", resumable=False)
    alpha: Optional[float] = setting(
        None, "width multiplier of the MobileNet family", metavar="A",
        cli_type=float)
    weights: Optional[str] = setting(
        "imagenet", "backbone weights: imagenet, none (random) or a weights file",
        metavar="imagenet|none|PATH", cli_type=_weights)
    image_size: Optional[int] = setting(
        None, "image side in pixels (default: the backbone's)", metavar="N",
        cli_type=int)
    epochs: int = setting(5, "epochs with the backbone frozen", metavar="N",
                          cli_type=int)
    fine_tune_epochs: int = setting(
        0, "epochs with the top of the backbone unfrozen", metavar="N", cli_type=int)
    fine_tune_layers: Optional[int] = setting(
        None, "layers of the backbone to unfreeze (default: the top 30%%)",
        metavar="N", cli_type=int)
    batch_size: int = setting(32, "examples per step", metavar="N", cli_type=int)
    learning_rate: float = setting(
        HEAD_LEARNING_RATE, "learning rate while the backbone is frozen; auto: "
        "the learning-rate finder's suggestion (see tftransfer lr-find)",
        metavar="LR|auto", cli_type=_rate)
    fine_tune_learning_rate: float = setting(
        FINE_TUNE_LEARNING_RATE, "learning rate while the top of the backbone is "
        "unfrozen; auto: the learning-rate finder's suggestion, found once the "
        "head is trained", metavar="LR|auto", cli_type=_rate)
    lr_decay: float = setting(
        1.0, "discriminative learning rates while fine-tuning: each lower block "
        "of the backbone (as its layer names number them) learns F times as fast "
        "as the block above it; 1: one rate", metavar="F", cli_type=float)
    fine_tune_warmup: float = setting(
        FINE_TUNE_WARMUP, "fine-tuning's rate rises linearly from 0 over this "
        "fraction of its first epoch, so the newly unfrozen layers do not lose "
        "what the head learnt; 0: no warm-up", metavar="F", cli_type=float)
    fine_tune_ema: float = setting(
        FINE_TUNE_EMA, "fine-tuning validates and keeps an exponential moving "
        "average of the weights with this momentum per step (lowered to span at "
        "most a quarter of fine-tuning), smoothing the first epochs' swings; "
        "0: the last step's weights (always with --prune)",
        metavar="M", cli_type=float)
    validation_split: float = setting(
        0.2, "held-out fraction when DATA_DIR has no val/ folder", metavar="F",
        cli_type=float)
    seed: int = setting(0, "split, shuffling and initialization seed", metavar="S",
                        cli_type=int)
    dropout: float = setting(0.2, "dropout rate before the head's last layer",
                             metavar="F", cli_type=float)
    cache_dir: Optional[str] = setting(
        None, "feature cache folder (default: $TFTRANSFER_CACHE_DIR, else "
        "~/.cache/tftransfer)", metavar="DIR", resumable=False)
    cache: bool = setting(
        True, "keep backbone features in memory, without the on-disk cache "
        "(fine-tuning's activations go to RUN_DIR/.activations, removed at the end)",
        flag="--no-cache")
    mixed_precision: str = setting(
        "auto", "Keras dtype policy of the backbone; auto: float16 on GPUs with "
        "Tensor Cores, off elsewhere", choices=PRECISIONS)
    jit: str = setting(
        "auto", "compile with XLA; auto: on GPUs, and on CPUs for networks without "
        "depthwise convolutions, where it was measured to pay", choices=JIT_SETTINGS,
        resumable=False)
    strategy: str = setting(
        "auto", "tf.distribute strategy; multi_worker trains on the machines "
        "TF_CONFIG names, --batch-size being the global batch; auto: multi_worker "
        "when TF_CONFIG names several, mirrored with several GPUs, else default",
        choices=STRATEGIES, resumable=False)
    tflite: Optional[str] = setting(
        None, "also write RUN_DIR/model.tflite for phones and edge devices, "
        "quantized so (none: float32), checked against the model on the "
        "validation split (model.parity.json); int8 calibrates on "
        f"{CALIBRATION_IMAGES} training images", choices=QUANTIZATIONS,
        metavar="|".join(QUANTIZATIONS), resumable=False)
    serving_max_pixels: int = setting(
        MAX_SERVING_PIXELS, "the exported SavedModel refuses an image whose header "
        "declares more pixels, before decoding it (a decompression bomb)",
        metavar="N", cli_type=int, resumable=False)
    report: bool = setting(
        True, "skip RUN_DIR/report/ (report.html: learning curves, confusion "
        "matrix, per-class scores, top losses, data) and the TensorBoard summary "
        "images", flag="--no-report", resumable=False)
    overwrite: bool = setting(
        False, "replace a finished run in RUN_DIR, or start an unfinished one over "
        "instead of resuming it", resumable=False)
    verbose: object = setting("auto", "progress output", cli=False, resumable=False)

    backbone_field = "backbone"  # The field naming the network that trains.

    @property
    def network(self) -> str:
        """The name of the backbone this run trains (`backbone` or `student`)."""
        return getattr(self, self.backbone_field)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Checks every value; called on construction.

        Raises:
            ValueError: a value out of range or not among its choices.
            TypeError: a value of the wrong type.
        """
        from tftransfer.backbones import check_backbone_options, get_backbone_spec
        from tftransfer.folders import check_folder_options

        for name in ("epochs", "fine_tune_epochs"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.epochs + self.fine_tune_epochs == 0:
            raise ValueError("Nothing to train: `epochs` and `fine_tune_epochs` "
                             "are both 0. Received: epochs=0, fine_tune_epochs=0")
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("serving_max_pixels", self.serving_max_pixels, minimum=1)
        for name in ("learning_rate", "fine_tune_learning_rate"):
            value = getattr(self, name)
            if value != "auto" and (not isinstance(value, (int, float))
                                    or isinstance(value, bool) or not value > 0):
                raise ValueError(f"`{name}` must be a number > 0 or \"auto\". "
                                 f"Received: {name}={value!r}")
        if (isinstance(self.lr_decay, bool) or not isinstance(self.lr_decay, (int, float))
                or not 0 < self.lr_decay <= 1):
            raise ValueError("`lr_decay` must be a number in (0, 1]. "
                             f"Received: lr_decay={self.lr_decay!r}")
        if (isinstance(self.fine_tune_warmup, bool)
                or not isinstance(self.fine_tune_warmup, (int, float))
                or not 0 <= self.fine_tune_warmup <= 1):
            raise ValueError("`fine_tune_warmup` must be a fraction of an epoch in "
                             f"[0, 1]. Received: fine_tune_warmup={self.fine_tune_warmup!r}")
        if (isinstance(self.fine_tune_ema, bool)
                or not isinstance(self.fine_tune_ema, (int, float))
                or not 0 <= self.fine_tune_ema < 1):
            raise ValueError("`fine_tune_ema` must be a momentum in [0, 1), 0 for "
                             f"none. Received: fine_tune_ema={self.fine_tune_ema!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"`dropout` must be in [0, 1). Received: dropout={self.dropout}")
        check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        check_choice("jit", self.jit, JIT_SETTINGS)
        check_choice("strategy", self.strategy, STRATEGIES)
        if self.tflite is not None:
            check_choice("tflite", self.tflite, QUANTIZATIONS)
        check_folder_options(self.data_dir, self.validation_split)
        if self.image_size is not None:
            _check_int("image_size", self.image_size, minimum=1)
        if is_fusion(self.network):
            self._check_fusion()
        else:
            self._take_member_options()
            spec = get_backbone_spec(self.network)
            setattr(self, self.backbone_field, spec.name)
            check_backbone_options(spec, self.image_size, self.alpha, self.weights)
            if self.fine_tune_layers is not None:
                _check_fine_tune_layers(self.fine_tune_layers, spec, self.alpha)
        if self.output is None:
            data_name = os.path.basename(os.path.normpath(self.data_dir)) or "data"
            self.output = os.path.join("saved_models",
                                       f"{data_name}-{self.default_output_name()}")

    def _take_member_options(self) -> None:
        """`--backbone NAME:alpha=A:size=N:weights=W` (a fusion member's form)
        for one backbone: the options become `alpha`, `image_size` and
        `weights`, unless those are set otherwise."""
        from tftransfer.fusion import split_member

        name, options = split_member(self.network)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, field in (("alpha", "alpha"), ("size", "image_size"),
                           ("weights", "weights")):
            if key not in options:
                continue
            current = getattr(self, field)
            if current not in (defaults[field], options[key]):
                raise ValueError(
                    f"`{self.backbone_field}` says {key}={options[key]} but "
                    f"`{field}` is {current!r}: give it once. Received: "
                    f"{self.backbone_field}={self.network!r}")
            setattr(self, field, options[key])
        setattr(self, self.backbone_field, name)

    def _check_fusion(self) -> None:
        """Checks a `--backbone a,b` fusion and writes it in canonical form
        (every member's size explicit), which is what a resume compares."""
        from tftransfer.backbones import check_backbone_options, get_backbone_spec
        from tftransfer.fusion import format_backbones, parse_backbones

        if self.backbone_field != "backbone":
            raise ValueError(f"A {self.backbone_field} is one backbone: distil into "
                             f"one (fuse the teacher instead). Received: "
                             f"{self.backbone_field}={self.network!r}")
        if self.alpha is not None:
            raise ValueError("`alpha` applies to one backbone; give each fused "
                             "member its own: NAME:alpha=A. "
                             f"Received: alpha={self.alpha}")
        if self.lr_decay != 1:
            raise ValueError("`lr_decay` applies to one backbone, not a fusion. "
                             f"Received: lr_decay={self.lr_decay}")
        members = parse_backbones(self.network, self.image_size)
        shared = [m.name for m in members if m.weights is None]
        if (shared and self.weights not in ("imagenet", None)
                and str(self.weights).lower() != "none"):
            raise ValueError(
                "A weights file fits one network: give it to its member, "
                "NAME:weights=PATH. Received: weights="
                f"{self.weights!r} for {', '.join(shared)}")
        for member in members:
            spec = get_backbone_spec(member.name)
            check_backbone_options(spec, member.image_size, member.alpha,
                                   member.weights or self.weights)
            if self.fine_tune_layers is not None:
                _check_fine_tune_layers(self.fine_tune_layers, spec, member.alpha)
        setattr(self, self.backbone_field, format_backbones(members))

    def default_output_name(self) -> str:
        if is_fusion(self.network):
            from tftransfer.fusion import fusion_name, parse_backbones

            return fusion_name(parse_backbones(self.network))
        return safe_name(self.network)

    def resume_settings(self) -> dict:
        """The settings that must not change for a killed run to resume.

        Also what every worker of a cluster must agree on. `output`, `jit`,
        `strategy` and the like may change: a run may resume elsewhere.
        """
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.metadata.get("resumable", True)}
        settings["data_dir"] = os.path.abspath(self.data_dir)
        return settings


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer. Received: {name}={value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}. Received: {name}={value}")


def _check_fine_tune_layers(value, spec, alpha) -> None:
    from tftransfer.graph import count_network_layers

    _check_int("fine_tune_layers", value, minimum=1)
    if spec.name.startswith("hub:"):
        return  # One opaque layer: fine-tuning unfreezes all of it.
    available = count_network_layers(spec.name, alpha)
    if value > available:
        raise ValueError(
            f"`fine_tune_layers` must be at most {available}, the layers of "
            f"{spec.name}. Received: fine_tune_layers={value}"
        )


def is_fusion(backbone) -> bool:
    """Whether a `--backbone` value names several members (holds a comma):
    a feature fusion (`tftransfer.fusion`)."""
    return isinstance(backbone, str) and "," in backbone


def safe_name(name: str) -> str:
    """A folder-name-safe form of a backbone name (`hub:` handles are URLs)."""
    if name.startswith("hub:"):
        name = "hub-" + os.path.basename(os.path.normpath(name[4:].rstrip("/")))
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@dataclasses.dataclass
class TrainConfig(RunConfig):
    """Settings of `train_run`: the command line's `train` options.

    Every field's help is in its metadata (`tftransfer train --help` shows it).
    The fields of `RunConfig` (data, schedule, cache, precision, XLA, strategy,
    run folder), plus:

    Args:
        backbone: A registered backbone name or `hub:HANDLE`. Defaults to
            `"mobilenet_v2"`.
        augment: Random flips, rotations and zooms of training images: the
            backbone then runs on every image every epoch. Defaults to `False`.
        class_weight: `"auto"` weighs each class's loss by the inverse of its
            share of the training images; `None` leaves them equal.
            Defaults to `None`.

    Raises:
        ValueError: a setting out of range, an unknown backbone, or more
            `fine_tune_layers` than the network has.

    Example:

    >>> import tempfile
    >>> from tftransfer.demo import write_demo_images
    >>> data = write_demo_images(tempfile.mkdtemp(), images_per_class=4,
    ...                          image_size=32)
    >>> config = TrainConfig(data, backbone="vgg16", weights=None, image_size=32)
    >>> config.epochs, config.learning_rate
    (5, 0.01)
    >>> TrainConfig(data, backbone="vgg16", fine_tune_layers=9999)
    Traceback (most recent call last):
    ...
    ValueError: `fine_tune_layers` must be at most 20, the layers of vgg16. Received: fine_tune_layers=9999
    """

    backbone: str = setting(
        "mobilenet_v2", "a registered backbone (see `tftransfer backbones`) or "
        "hub:HANDLE; several, comma-separated, fuse their features: "
        "NAME[:alpha=A][:size=N][:weights=W],NAME...", metavar="NAME")
    augment: bool = setting(
        False, "random flips, rotations and zooms while training (no feature cache)")
    class_weight: Optional[str] = setting(
        None, "auto: weigh each class's loss by the inverse of its share of the "
        "training images; none: equal", choices=["auto", None],
        cli_type=_class_weight, metavar="auto|none")
    cut: Optional[str] = setting(
        None, "cut the backbone after this layer (a block output: `tftransfer "
        "probe` lists them) and train, fine-tune and export only the layers "
        "kept; auto: probe every block output with a linear head and take the "
        "shallowest within --cut-tolerance of the best", metavar="auto|LAYER")
    cut_tolerance: float = setting(
        CUT_TOLERANCE, "--cut auto: accuracy a shallower cut may lose against the "
        "best cut (a linear head's, cross-validated over the training and "
        "validation images)", metavar="F", cli_type=float)
    prune: Optional[float] = setting(
        None, "magnitude pruning while fine-tuning: this fraction of each "
        "unfrozen kernel's weights (depthwise kernels excepted) is set to zero, "
        "the smallest first, rising on "
        "a polynomial schedule over the first half of fine-tuning and "
        "kept zero by a mask through every step and a resume (the files shrink "
        "when compressed)", metavar="SPARSITY", cli_type=float)
    prune_filters: Optional[float] = setting(
        None, "remove this fraction of the filters of each convolution in the "
        "unfrozen top (the smallest by L1 norm) before training, then fine-tune: "
        "a narrower, faster network; for chains of convolutions (VGG16, VGG19, "
        "MobileNet)", metavar="F", cli_type=float)

    def check(self) -> None:
        super().check()
        from tftransfer.backbones import get_backbone_spec

        self._check_cut()
        self._check_pruning()

        if self.image_size is None and is_fusion(self.backbone):
            from tftransfer.fusion import fusion_image_size, parse_backbones

            self.image_size = fusion_image_size(parse_backbones(self.backbone))
        elif self.image_size is None:
            self.image_size = get_backbone_spec(self.backbone).default_image_size
        if self.class_weight not in (None, "auto"):
            raise ValueError("`class_weight` must be 'auto' or None. "
                             f"Received: class_weight={self.class_weight!r}")


    def _check_pruning(self) -> None:
        for name, what in (("prune", "prunes the weights of the unfrozen top "
                                     "while it trains"),
                           ("prune_filters", "narrows the unfrozen top, which "
                                             "must then train to recover")):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 < value < 1:
                raise ValueError(f"`{name}` must be a fraction in (0, 1). "
                                 f"Received: {name}={value!r}")
            if self.fine_tune_epochs == 0:
                raise ValueError(
                    f"`{name}` {what}: give it fine-tuning epochs "
                    f"(--fine-tune-epochs N). Received: {name}={value}, "
                    "fine_tune_epochs=0")
            if is_fusion(self.backbone) or self.backbone.startswith("hub:"):
                raise ValueError(
                    f"`{name}` works on the layers of one Keras Applications "
                    "backbone, not on a fusion or a hub module (one opaque "
                    f"layer). Received: backbone={self.backbone!r}")

    def _check_cut(self) -> None:
        if (isinstance(self.cut_tolerance, bool)
                or not isinstance(self.cut_tolerance, (int, float))
                or not 0 <= self.cut_tolerance < 1):
            raise ValueError("`cut_tolerance` must be a number in [0, 1). "
                             f"Received: cut_tolerance={self.cut_tolerance!r}")
        if self.cut is None:
            return
        if not isinstance(self.cut, str) or not self.cut.strip():
            raise ValueError("`cut` must be \"auto\" or a layer name. "
                             f"Received: cut={self.cut!r}")
        if is_fusion(self.backbone):
            raise ValueError("A fusion of several backbones has no single depth to "
                             "cut: probe and cut each member on its own. "
                             f"Received: cut={self.cut!r}, backbone={self.backbone!r}")
        if self.backbone.startswith("hub:"):
            raise ValueError("A TF-Hub or SavedModel backbone is one opaque layer, "
                             "with no block outputs to cut at: use a registered "
                             f"backbone. Received: cut={self.cut!r}")


@dataclasses.dataclass
class DistillConfig(RunConfig):
    """Settings of `distill_run`: the command line's `distill` options.

    The fields of `RunConfig`, with a head learning rate of `1e-3` (the
    distillation loss is softer than cross-entropy), plus:

    Args:
        teacher: A run folder, `.keras` file or tftransfer SavedModel (see
            `load_teacher`).
        student: The student's backbone name. Defaults to `"mobilenet_v2"`.
        temperature: Softens both distributions. Defaults to `3.0`.
        student_loss_weight: Weight of the hard-label loss; `1 - w` goes to
            matching the teacher. Defaults to `0.5`.
        unsafe_deserialization: Load a `.keras` teacher whose backbone is a
            hub module (which runs an external SavedModel's graph). Defaults
            to `False`.

    Raises:
        ValueError: a setting out of range.
        TransferError: no teacher model at `teacher`.

    Example:

    >>> import tempfile
    >>> import keras
    >>> from tftransfer.demo import write_demo_images
    >>> data = write_demo_images(tempfile.mkdtemp(), images_per_class=4,
    ...                          image_size=32)
    >>> teacher = os.path.join(tempfile.mkdtemp(), "teacher.keras")
    >>> keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]).save(teacher)
    >>> config = DistillConfig(data, teacher=teacher, student="vgg16",
    ...                        weights=None)
    >>> config.network, config.learning_rate, config.temperature
    ('vgg16', 0.001, 3.0)
    >>> config.output.endswith("-distilled-vgg16")
    True
    >>> DistillConfig(data, teacher=teacher, student="vgg16", temperature=0)
    Traceback (most recent call last):
    ...
    ValueError: `temperature` must be > 0. Received: temperature=0
    """

    teacher: str = setting(
        help="a run folder, a .keras file or a tftransfer SavedModel",
        metavar="MODEL", required=True, kw_only=False, resumable=False)
    student: str = setting("mobilenet_v2", "student backbone", metavar="NAME")
    temperature: float = setting(3.0, "softens both distributions", metavar="T",
                                 cli_type=float)
    student_loss_weight: float = setting(
        0.5, "weight of the hard-label loss; 1-W goes to matching the teacher",
        metavar="W", cli_type=float)
    learning_rate: float = setting(
        1e-3, "learning rate while the student's backbone is frozen", metavar="LR",
        cli_type=float)
    fine_tune_learning_rate: float = setting(
        FINE_TUNE_LEARNING_RATE, "learning rate while the top of the student's "
        "backbone is unfrozen", metavar="LR", cli_type=float)
    unsafe_deserialization: bool = setting(
        False, "load a .keras teacher whose backbone is a TF-Hub module: that runs "
        "an external SavedModel's graph, so only for files you trust",
        resumable=False)

    backbone_field = "student"

    def check(self) -> None:
        super().check()
        for name in ("learning_rate", "fine_tune_learning_rate"):
            if getattr(self, name) == "auto":
                raise ValueError(
                    f"`{name}=\"auto\"` is for `train`: the range test trains on "
                    "the labels alone, not on the teacher's outputs. Run "
                    "`tftransfer lr-find` on the data and pass its rate, or a "
                    f"number. Received: {name}=\"auto\"")
        if not self.temperature > 0:
            raise ValueError(
                f"`temperature` must be > 0. Received: temperature={self.temperature}")
        if not 0 <= self.student_loss_weight <= 1:
            raise ValueError(
                "`student_loss_weight` must be between 0 and 1. "
                f"Received: student_loss_weight={self.student_loss_weight}")
        from tftransfer.teacher import teacher_kind

        teacher_kind(self.teacher)  # Raises when no teacher is there.

    def default_output_name(self) -> str:
        return f"distilled-{safe_name(self.network)}"


def add_arguments(parser: argparse.ArgumentParser, config_class) -> None:
    """Adds an option (or argument) to `parser` for each field of `config_class`."""
    for field in dataclasses.fields(config_class):
        meta = field.metadata
        if not meta.get("cli", False):
            continue
        default = None if field.default is dataclasses.MISSING else field.default
        help_text = meta["help"]
        if meta["positional"]:
            parser.add_argument(field.name, metavar=meta["metavar"], help=help_text)
            continue
        names = [meta["flag"] or "--" + field.name.replace("_", "-")]
        if meta["short"]:
            names.append(meta["short"])
        if field.type in (bool, "bool"):
            action = "store_false" if default else "store_true"
            parser.add_argument(*names, dest=field.name, action=action,
                                default=default, help=help_text)
            continue
        choices = meta["choices"]
        shown = default if default is not None or meta["required"] else None
        if shown is not None and "(default" not in help_text:
            help_text += f" (default: {shown})"
        kwargs = dict(dest=field.name, default=default, help=help_text,
                      metavar=meta["metavar"], required=meta["required"],
                      type=meta["cli_type"])
        if choices is not None and meta["cli_type"] is None:
            kwargs["choices"] = choices
        parser.add_argument(*names, **kwargs)


def from_arguments(config_class, args: argparse.Namespace):
    """The `config_class` instance for parsed command-line `args`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
              if f.metadata.get("cli", False)}
    return config_class(**values)

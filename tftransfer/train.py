"""Fine-tuning a classifier from Python: `fine_tune`, and the pieces it is built of.

`fine_tune` runs the phase engine (`tftransfer.engine`) on a user's `tf.data`
batches: the head on backbone features computed once per image instead of once
per image per epoch (with the backbone frozen and no random augmentation the
features never change, so the result is the model the plain Keras recipe gives,
at the cost of one forward pass), then the top of the backbone at a lower rate.
"""

from __future__ import annotations

from typing import Optional, Union

import keras
import numpy as np
import tensorflow as tf

from tftransfer.errors import check_choice
from tftransfer.graph import backbone_network
from tftransfer.settings import (
    FINE_TUNE_EMA,
    FINE_TUNE_LEARNING_RATE,
    FINE_TUNE_WARMUP,
    HEAD_LEARNING_RATE,
    JIT_SETTINGS,
)


def compile_classifier(model: keras.Model, learning_rate: Optional[float] = None,
                       jit_compile="auto", optimizer=None) -> None:
    """Adam, sparse cross-entropy on logits, and accuracy: both phases use these.

    `jit_compile` is passed to `compile` (see `jit_for`). `optimizer`, if
    given, replaces `Adam(learning_rate)`.
    """
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )


def warm_adam(learning_rate: float, warmup_steps: int = 0, ema: float = 0.0,
              adjustable: bool = False, **options) -> keras.optimizers.Adam:
    """Adam at `learning_rate`, reached over `warmup_steps` (`linear_warmup`),
    keeping a moving average of the weights with momentum `ema` (Keras'
    `use_ema`; `0` for none). `adjustable`: the rate is an `AdjustableWarmup`,
    which can change after the training step is traced. `options` go to
    `Adam` (its `name`)."""
    if ema:
        options.update(use_ema=True, ema_momentum=ema)
    rate = (AdjustableWarmup(learning_rate, warmup_steps) if adjustable
            else linear_warmup(learning_rate, warmup_steps))
    return keras.optimizers.Adam(rate, **options)


@keras.saving.register_keras_serializable(package="tftransfer")
class AdjustableWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """`linear_warmup`'s rate, held in variables read by the traced step.

    A schedule's numbers are constants in Keras' traced training step, and
    a new rate means a new optimizer and a new trace (about 0.8 s for
    MobileNetV2's top). This one reads `learning_rate` and `override` (the
    step's rate when positive) at each step, so that the learning-rate range
    test can step through the phase's own compiled `fit` and the rate it finds
    is set after (`lr_find_in_fit`).

    Args:
        learning_rate: The rate after the warm-up.
        warmup_steps: Steps to rise linearly from 0 to it. Defaults to `0`.

    Example:

    >>> schedule = AdjustableWarmup(1e-3, warmup_steps=10)
    >>> [round(float(schedule(step)), 6) for step in (0, 5, 10, 100)]
    [0.0, 0.0005, 0.001, 0.001]
    >>> _ = schedule.learning_rate.assign(2e-3)
    >>> round(float(schedule(100)), 6)
    0.002
    """

    def __init__(self, learning_rate: float, warmup_steps: int = 0):
        self.warmup_steps = int(warmup_steps)
        self.learning_rate = tf.Variable(float(learning_rate), trainable=False,
                                         dtype=tf.float32, name="learning_rate")
        self.override = tf.Variable(0.0, trainable=False, dtype=tf.float32,
                                    name="learning_rate_override")

    def __call__(self, step):
        rate = tf.convert_to_tensor(self.learning_rate)
        if self.warmup_steps > 0:
            rate *= tf.minimum(1.0, tf.cast(step, tf.float32) / self.warmup_steps)
        return tf.where(self.override > 0, tf.convert_to_tensor(self.override), rate)

    def get_config(self) -> dict:
        return {"learning_rate": float(self.learning_rate.numpy()),
                "warmup_steps": self.warmup_steps}


class AverageAtEnd(keras.callbacks.Callback):
    """At the end of epoch `end`, the last, puts the optimizer's moving
    average of the weights (`use_ema`) into the model.

    Keras' `fit` does it once training is over, after the callbacks: a
    checkpoint written at the last epoch's end would hold the raw weights,
    and a run killed after it would serve other weights than a whole run.
    Put it before the checkpoint's callback.

    Args:
        end: The epoch `fit` trains up to (its `epochs`).
    """

    def __init__(self, end: int):
        super().__init__()
        self.end = end

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.end:
            self.model.optimizer.finalize_variable_values(
                self.model.trainable_variables)


def linear_warmup(learning_rate: float, steps: int):
    """`learning_rate`, reached linearly from 0 over the first `steps` steps.

    Fine-tuning starts a fresh Adam on newly unfrozen layers: its first steps
    move every weight by about the full rate whatever its gradient, which
    undoes part of what the pretrained layers and the head hold (a 10-class
    set fell from 0.871 to 0.751 in the first fine-tuning epoch). Rising
    from 0 lets Adam's moment estimates settle first. Keras' `CosineDecay`
    does the warm-up; `alpha=1` keeps the rate flat after it.

    Args:
        learning_rate: The rate after the warm-up.
        steps: Warm-up steps; `0` returns `learning_rate` itself.

    Returns:
        A float, or a `keras.optimizers.schedules.LearningRateSchedule`.

    Example:

    >>> schedule = linear_warmup(1e-3, steps=10)
    >>> [round(float(schedule(step)), 6) for step in (0, 5, 10, 100)]
    [0.0, 0.0005, 0.001, 0.001]
    >>> linear_warmup(1e-3, 0)
    0.001
    """
    if steps <= 0:
        return learning_rate
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=1, alpha=1.0, warmup_target=learning_rate,
        warmup_steps=steps)


def jit_for(setting: str, model: keras.Model) -> bool:
    """Whether to compile `model`'s steps with XLA, for a `--jit` setting.

    `"on"` and `"off"` are obeyed. `"auto"` turns XLA on where it was measured
    to pay (benchmarks/xla.py, results in benchmarks/RESULTS.md):

    - on GPUs, as Keras' own `jit_compile="auto"` does, and as it, not for a
      model built under a `tf.distribute` strategy, nor inside one's scope;
    - on CPUs, only for convolutional networks without depthwise, separable
      or grouped convolutions (VGG, ResNet, DenseNet...): XLA's CPU depthwise
      convolution made MobileNet and EfficientNet several times slower. A head alone on
      features (no convolution) is faster without XLA: its steps are too small
      for compilation to pay. A TF-Hub module is opaque: no XLA on CPUs.
    """
    check_choice("jit", setting, JIT_SETTINGS)
    if setting != "auto":
        return setting == "on"
    if tf.distribute.has_strategy() or getattr(model, "_distribute_strategy", None):
        # As Keras' own "auto" for a model built or compiled under a strategy.
        return False
    if tf.config.list_physical_devices("GPU"):
        return True
    from tftransfer.hub import HubFeatureExtractor

    layers, stack = [], list(model.layers)
    while stack:  # Nested models (the backbone in the classifier) included.
        layer = stack.pop()
        layers.append(layer)
        stack.extend(getattr(layer, "layers", []))
    if any(isinstance(layer, (keras.layers.DepthwiseConv2D,
                              keras.layers.SeparableConv2D, HubFeatureExtractor))
           or getattr(layer, "groups", 1) > 1  # ConvNeXt's depthwise Conv2D
           for layer in layers):
        return False
    return any(isinstance(layer, keras.layers.Conv2D) for layer in layers)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict:
    """Weights `n / (k * n_c)` per class, so each class weighs the same in the loss.

    The same rule as scikit-learn's `class_weight="balanced"`: `n` training
    labels, `k` classes, `n_c` labels of class `c`.

    Args:
        labels: The training labels, integers in `0..num_classes - 1`.
        num_classes: The number of classes, `k`.

    Returns:
        A `{label: weight}` dict for every class, as `fit`'s (and
        `fine_tune`'s) `class_weight` takes.

    Raises:
        ValueError: a class has no label in `labels`.

    Example:

    >>> balanced_class_weights([0, 0, 1, 1, 1, 1], num_classes=2)
    {0: 1.5, 1: 0.75}
    >>> balanced_class_weights([0, 0, 1], num_classes=3)
    Traceback (most recent call last):
    ...
    ValueError: Every class needs a training image for balanced class weights. Received: counts per class [2, 1, 0]
    """
    counts = np.bincount(np.asarray(labels, "int64"), minlength=num_classes)
    if not counts.all():
        raise ValueError(
            "Every class needs a training image for balanced class weights. "
            f"Received: counts per class {counts.tolist()}"
        )
    return {i: float(counts.sum() / (num_classes * c)) for i, c in enumerate(counts)}


def unfreeze_top(backbone: keras.Model, num_layers: int) -> int:
    """Makes the top `num_layers` layers of the backbone's network trainable.

    BatchNormalization layers stay frozen: with few images their statistics would
    drift, and the backbone is called with `training=False` so they also keep
    using their ImageNet moving averages. The layers below the top are frozen.
    A TF-Hub backbone is one layer: all of it is unfrozen, whatever
    `num_layers`.

    Args:
        backbone: A model from `load_backbone` (alone or inside a
            `build_classifier` model, which then trains the unfrozen layers).
        num_layers: How many of the network's top layers to unfreeze, between
            1 and the number of its layers (see `default_fine_tune_layers`).

    Returns:
        The number of layers that hold trainable weights after the change.

    Raises:
        ValueError: `num_layers` is not between 1 and the network's layers.

    Example:

    >>> from tftransfer import load_backbone
    >>> backbone = load_backbone("vgg16", weights=None, image_size=32)
    >>> len(backbone.trainable_weights)
    0
    >>> unfreeze_top(backbone, 4)  # Pooling layers hold no weights.
    2
    >>> len(backbone.trainable_weights)  # Two convolutions' kernels and biases.
    4
    >>> unfreeze_top(backbone, 0)
    Traceback (most recent call last):
    ...
    ValueError: `num_layers` must be between 1 and 20 for vgg16. Received: num_layers=0
    """
    from tftransfer.hub import hub_layer

    module = hub_layer(backbone)
    if module is not None:
        # A hub module is one layer: fine-tuning unfreezes all of it.
        backbone.trainable = True
        module.trainable = True
        return 1
    network = backbone_network(backbone)
    layers = network.layers
    if not 0 < num_layers <= len(layers):
        raise ValueError(
            f"`num_layers` must be between 1 and {len(layers)} for {network.name}. "
            f"Received: num_layers={num_layers}"
        )
    backbone.trainable = True
    cut = len(layers) - num_layers
    for index, layer in enumerate(layers):
        layer.trainable = index >= cut and not isinstance(
            layer, keras.layers.BatchNormalization
        )
    return sum(1 for layer in layers if layer.trainable and layer.trainable_weights)


def default_fine_tune_layers(backbone: keras.Model) -> int:
    """The top 30% of the network's layers: the usual choice for small data sets.

    A hub backbone is one layer: 1.
    """
    from tftransfer.hub import hub_layer

    if hub_layer(backbone) is not None:
        return 1
    return max(1, round(0.3 * len(backbone_network(backbone).layers)))


def compute_features(backbone: keras.Model, dataset: tf.data.Dataset, verbose="auto",
                     jit_compile: bool = False) -> tuple:
    """Runs a frozen backbone once over `(pixels, label)` batches.

    Args:
        backbone: A model from `load_backbone` (or any model on pixels).
        dataset: Batches of `(pixels, label)`.
        verbose: Unused; kept for compatibility. Defaults to `"auto"`.
        jit_compile: Compile the forward pass with XLA (see `jit_for`).
            Defaults to `False`.

    Returns:
        `(features, labels)` as NumPy arrays, in the dataset's order.

    Example:

    >>> import tensorflow as tf, numpy as np
    >>> from tftransfer import load_backbone
    >>> backbone = load_backbone("vgg16", weights=None, image_size=32)
    >>> pixels = np.zeros((4, 32, 32, 3), "float32")
    >>> dataset = tf.data.Dataset.from_tensor_slices((pixels, [0, 1, 0, 1])).batch(2)
    >>> features, labels = compute_features(backbone, dataset)
    >>> features.shape, labels.tolist()
    ((4, 512), [0, 1, 0, 1])
    """
    from tftransfer.examples import DatasetExamples

    examples = DatasetExamples({"train": dataset})
    features, _ = examples.outputs(backbone, None, "train", jit_compile=jit_compile)
    return features, examples.labels("train")


def fine_tune(
    model: keras.Model,
    train: tf.data.Dataset,
    validation: tf.data.Dataset,
    epochs: int = 5,
    fine_tune_epochs: int = 0,
    learning_rate: float = HEAD_LEARNING_RATE,
    fine_tune_learning_rate: float = FINE_TUNE_LEARNING_RATE,
    fine_tune_layers: Optional[int] = None,
    callbacks: Optional[list] = None,
    class_weight: Optional[dict] = None,
    jit_compile: Union[str, bool] = "auto",
    augment=None,
    cache_features: Optional[bool] = None,
    output: Optional[str] = None,
    cache_dir: Optional[str] = None,
    overwrite: bool = False,
    class_names: Optional[list] = None,
    batch_size: int = 32,
    seed: int = 0,
    verbose="auto",
    lr_decay: float = 1.0,
    fine_tune_warmup: float = FINE_TUNE_WARMUP,
    prune: Optional[float] = None,
    fine_tune_ema: float = FINE_TUNE_EMA,
) -> keras.callbacks.History:
    """Trains a `build_classifier` model: the head first, then the backbone's top.

    The head trains on backbone features computed once per image; then, if
    `fine_tune_epochs > 0`, the top `fine_tune_layers` layers of the backbone
    are unfrozen (BatchNormalization stays frozen) and trained at
    `fine_tune_learning_rate`, from activations of the frozen bottom computed
    in the same pass as the features (cached on disk, or spilled to a
    temporary folder without a cache), then frozen again. To train on several GPUs,
    build `model` and call this under a `tf.distribute.MirroredStrategy`'s
    `scope()` (see `make_strategy`).

    Args:
        model: A classifier from `build_classifier`, its backbone frozen.
        train: Training `(pixels, label)` batches, pixels 0..255 at the model's
            size. Without `augment`, each pass must give the same images.
        validation: Validation `(pixels, label)` batches.
        epochs: Epochs with the backbone frozen. Defaults to `5`.
        fine_tune_epochs: Epochs after unfreezing the top of the backbone.
            Defaults to `0` (no unfreezing).
        learning_rate: Adam learning rate of the head phase, or `"auto"`: the
            learning-rate finder's suggestion (`lr_find`). Defaults to `1e-2`:
            a linear head on fixed features converges in a few epochs at this
            rate (on hymenoptera, 5 epochs: 0.915 mean val accuracy over 3 seeds,
            against 0.873 at Keras' usual 1e-3).
        fine_tune_learning_rate: Learning rate of the fine-tuning phase, low so
            that the pretrained weights move little, or `"auto"`.
            Defaults to `1e-4`.
        fine_tune_layers: How many of the network's top layers to unfreeze.
            Defaults to `None`: the top 30% (`default_fine_tune_layers`).
        callbacks: Keras callbacks for every phase's `fit`. In the head phase
            their `model` is the head (trained on features); while fine-tuning
            from activations, the backbone's top with the head
            (`"classifier_top"`, taking activations). Defaults to `None`.
        class_weight: Optional `{label: weight}` for the loss, as in `fit`
            (see `balanced_class_weights`). Defaults to `None`.
        jit_compile: `"auto"`, `True` or `False`: compile each phase's steps
            with XLA; `"auto"` where it was measured to pay (see `jit_for`).
            Defaults to `"auto"`.
        augment: `True` for random flips, rotations and zooms of the training
            batches, or a callable (e.g. a `keras.Sequential` of random layers)
            applied to them; the backbone then runs on every view, every epoch.
            Defaults to `None`.
        cache_features: Train the head on features computed once. Defaults to
            `None`: yes, unless `augment`. `True` with `augment` is refused.
        output: A run folder to write, as `tftransfer train` does: history.csv,
            a checkpoint every epoch (the same call resumes after a kill),
            `model.keras`, `saved_model/` and `metrics.json`. Defaults to `None`.
        cache_dir: The on-disk feature cache. Defaults to `None`: the default
            cache folder (`default_cache_dir()`) with `output`, else features
            are kept in memory and the activations fine-tuning trains on
            spill to a temporary folder (in `$TMPDIR`), removed at the end.
        overwrite: With `output`: replace a finished run, or start an
            unfinished one over. Defaults to `False`.
        class_names: With `output`: the names written to `labels.txt` and
            served. Defaults to `None`: `"0"`, `"1"`, ...
        batch_size: Batch size of the datasets made from features.
            Defaults to `32`.
        seed: Shuffling seed for training on features. Defaults to `0`.
        verbose: Passed to `fit`. Defaults to `"auto"`.
        lr_decay: Discriminative rates while fine-tuning: each lower block of
            the backbone learns `lr_decay` times as fast as the block above
            (`discriminative_optimizer`). Defaults to `1.0`: one rate.
        fine_tune_warmup: The fine-tuning rate rises linearly from 0 over
            this fraction of the first fine-tuning epoch (`linear_warmup`).
            Defaults to `0.3`.
        prune: Magnitude pruning while fine-tuning: this fraction of each
            unfrozen kernel (depthwise ones excepted) is zero at the end, by a
            `MagnitudePruning` schedule over the first half of fine-tuning,
            with the top's batch normalisation recalibrated after each step
            of it. Defaults to `None`: no pruning.
        fine_tune_ema: Fine-tuning validates with, and ends on, the
            exponential moving average of the weights with this momentum per
            step (Keras' `use_ema` and `SwapEMAWeights`), lowered to span at
            most a quarter of fine-tuning; `0` for the last step's weights.
            Not with `prune`. Defaults to `0.95`.

    Returns:
        A `keras.callbacks.History` over both phases: per-epoch metrics and a
        `phase` entry (`"head"` or `"fine_tune"`) per epoch. `model` is left
        compiled, so `model.evaluate` and `model.predict` work.

    Raises:
        ValueError: `cache_features=True` with `augment`, or a bad setting.
        RunFolderError: `output` holds a finished run (without `overwrite`), an
            unfinished run with other settings, or is in use.

    Example:

    >>> import tempfile
    >>> import tftransfer
    >>> from tftransfer.demo import write_demo_images
    >>> folder = write_demo_images(tempfile.mkdtemp(), images_per_class=8,
    ...                            image_size=32)
    >>> data = tftransfer.image_folder_datasets(folder, image_size=32, batch_size=8)
    >>> backbone = tftransfer.load_backbone("vgg16", weights=None, image_size=32)
    >>> model = tftransfer.build_classifier(backbone, num_classes=3)
    >>> history = fine_tune(model, data.train, data.validation, epochs=2,
    ...                     verbose=0)
    >>> history.history["phase"]
    ['head', 'head']
    >>> loss, accuracy = model.evaluate(data.validation, verbose=0)
    """
    from tftransfer.engine import Engine, Schedule
    from tftransfer.examples import DatasetExamples

    jit = {True: "on", False: "off"}.get(jit_compile, jit_compile)
    check_choice("jit_compile", jit, (*JIT_SETTINGS, True, False))
    if augment is not None and augment is not False:
        if cache_features:
            raise ValueError(
                "Feature caching and `augment` exclude each other: random views "
                "change every epoch, so the backbone must run on each. Pass "
                "cache_features=False (or leave it out) to augment. Received: "
                "cache_features=True, augment=" + repr(augment))
        if augment is True:
            from tftransfer.run import augmentation_layers

            augment = augmentation_layers(seed)
        layers = augment
        train = train.map(lambda x, y: (layers(x, training=True), y),
                          num_parallel_calls=tf.data.AUTOTUNE)
    augmented = augment not in (None, False) or cache_features is False
    if cache_dir is None and output is not None:
        from tftransfer.cache import default_cache_dir

        cache_dir = default_cache_dir()
    schedule = Schedule(epochs, fine_tune_epochs, fine_tune_layers, learning_rate,
                        fine_tune_learning_rate, batch_size, seed, jit,
                        augment=augmented, cache_dir=cache_dir, verbose=verbose,
                        lr_decay=lr_decay, fine_tune_warmup=fine_tune_warmup,
                        prune=prune, fine_tune_ema=fine_tune_ema)
    examples = DatasetExamples({"train": train, "validation": validation}, batch_size)
    if output is None:
        engine = Engine(model, examples, schedule, callbacks=callbacks,
                        class_weight=class_weight)
        history = engine.run()
        engine.close()
    else:
        from tftransfer.run import run_in_folder

        history, engine = run_in_folder(model, examples, schedule, output, overwrite,
                                        callbacks, class_weight, class_names)
    engine.compile_for_use()
    return history

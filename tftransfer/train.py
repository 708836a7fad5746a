"""The fine-tuning schedule: train the head on a frozen backbone, then its top.

The frozen phase trains the head on backbone features computed once per image
instead of once per image per epoch: with the backbone frozen and no random
augmentation the features never change, so the result is the same model the
plain Keras recipe gives, at the cost of one forward pass.
"""

from __future__ import annotations

import csv
import os
import warnings
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tftransfer.backbones import backbone_network
from tftransfer.errors import check_choice

# Keras warns on every `fit` over a dataset that its default `shuffle=True` is
# ignored; our datasets shuffle themselves, so the warning only misleads.
warnings.filterwarnings("ignore", message="`shuffle=True` was passed")


class HistoryCSV(keras.callbacks.Callback):
    """Appends one row per finished epoch to a CSV file, flushed at once.

    `keras.callbacks.CSVLogger` is not used because it has no column for the
    training phase and fixes its columns from the first model it logs, while the
    two phases here are two `fit` calls.

    Args:
        path: The CSV file; created with a header if missing, appended otherwise.
        phase: Written in the `phase` column (`"head"` or `"fine_tune"`).
    """

    def __init__(self, path: str, phase: str):
        super().__init__()
        self.path = path
        self.phase = phase

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        columns = None
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, newline="") as handle:
                columns = next(csv.reader(handle), None)
        write_header = columns is None
        if write_header:
            columns = ["epoch", "phase", *sorted(logs)]
        row = {"epoch": epoch + 1, "phase": self.phase, **logs}
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            if write_header:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()
            os.fsync(handle.fileno())


HEAD_LEARNING_RATE = 1e-2
FINE_TUNE_LEARNING_RATE = 1e-4


JIT_SETTINGS = ("auto", "on", "off")


def compile_classifier(model: keras.Model, learning_rate: float,
                       jit_compile="auto") -> None:
    """Adam, sparse cross-entropy on logits, and accuracy: both phases use these.

    `jit_compile` is passed to `compile` (see `jit_for`).
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )


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


def compute_features(
    backbone: keras.Model, dataset: tf.data.Dataset, verbose="auto",
    jit_compile: bool = False,
) -> tuple:
    """Runs a frozen backbone once over a `(pixels, label)` dataset.

    Streaming: the pipeline decodes the next batches while one goes through the
    network, and only the features are kept. `jit_compile` compiles the forward
    pass with XLA (see `jit_for`).

    Returns:
        `(features, labels)` as NumPy arrays.
    """

    @tf.function(reduce_retracing=True, jit_compile=jit_compile)
    def forward(pixels):
        return backbone(pixels, training=False)

    steps = int(dataset.cardinality())
    bar = keras.utils.Progbar(
        steps if steps > 0 else None,
        unit_name="batch",
        verbose=1 if verbose == "auto" else verbose,
    )
    features, labels = [], []
    for step, (pixels, label) in enumerate(dataset, 1):
        features.append(forward(pixels).numpy())
        labels.append(label.numpy())
        bar.update(step)
    if not features:
        raise ValueError("Cannot compute features of an empty dataset.")
    return np.concatenate(features), np.concatenate(labels)


def feature_dataset(features, labels, batch_size, shuffle=False, seed=0):
    """Batches of precomputed `(features, labels)`, reshuffled each epoch if asked."""
    dataset = tf.data.Dataset.from_tensor_slices((features, labels))
    if shuffle:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def train_head(
    head: keras.Model,
    train_features: tuple,
    validation_features: tuple,
    epochs: int,
    batch_size: int = 32,
    seed: int = 0,
    callbacks: Optional[list] = None,
    initial_epoch: int = 0,
    class_weight: Optional[dict] = None,
    verbose="auto",
) -> keras.callbacks.History:
    """Trains a compiled head on precomputed `(features, labels)` pairs.

    `epochs` is the index of the last epoch, as in `fit`: training runs from
    `initial_epoch` to `epochs`.
    """
    return head.fit(
        feature_dataset(*train_features, batch_size, shuffle=True, seed=seed),
        validation_data=feature_dataset(*validation_features, batch_size, False, seed),
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=callbacks,
        class_weight=class_weight,
        verbose=verbose,
    )


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict:
    """Weights `n / (k * n_c)` per class, so each class weighs the same in the loss.

    The same rule as scikit-learn's `class_weight="balanced"`.
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
    using their ImageNet moving averages.

    Returns:
        The number of layers that hold trainable weights after the change.
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


def fine_tune(
    model: keras.Model,
    train: tf.data.Dataset,
    validation: tf.data.Dataset,
    epochs: int = 5,
    fine_tune_epochs: int = 0,
    learning_rate: float = HEAD_LEARNING_RATE,
    fine_tune_learning_rate: float = FINE_TUNE_LEARNING_RATE,
    fine_tune_layers: Optional[int] = None,
    cache_features: bool = True,
    batch_size: int = 32,
    seed: int = 0,
    callbacks_for=None,
    class_weight: Optional[dict] = None,
    jit: str = "auto",
    verbose="auto",
) -> dict:
    """Trains a `build_classifier` model: the head first, then the backbone's top.

    To train on several GPUs, build `model` and call this under a
    `tf.distribute.MirroredStrategy`'s `scope()` (see `make_strategy`).

    Args:
        model: A classifier from `build_classifier`, its backbone frozen.
        train: Training `(pixels, label)` batches.
        validation: Validation `(pixels, label)` batches.
        epochs: Epochs with the backbone frozen. Defaults to `5`.
        fine_tune_epochs: Epochs after unfreezing the top of the backbone.
            Defaults to `0` (no unfreezing).
        learning_rate: Adam learning rate of the head phase. Defaults to `1e-2`:
            a linear head on fixed features converges in a few epochs at this
            rate (on hymenoptera, 5 epochs: 0.915 mean val accuracy over 3 seeds,
            against 0.873 at Keras' usual 1e-3), and epochs on cached features
            cost almost nothing.
        fine_tune_learning_rate: Learning rate of the fine-tuning phase, low so
            that the pretrained weights move little. Defaults to `1e-4`.
        fine_tune_layers: How many of the network's top layers to unfreeze.
            Defaults to `default_fine_tune_layers`.
        cache_features: Train the head phase on features computed once. Must be
            `False` when `train` is randomly augmented. Defaults to `True`.
        batch_size: Batch size for training on features. Defaults to `32`.
        seed: Shuffling seed for training on features. Defaults to `0`.
        callbacks_for: Optional `callable(phase) -> list` of callbacks for the
            `"head"` and `"fine_tune"` phases.
        class_weight: Optional `{label: weight}` for the loss, as in `fit`
            (see `balanced_class_weights`). Defaults to `None`.
        jit: `"auto"`, `"on"` or `"off"`: whether each phase's steps are
            compiled with XLA (see `jit_for`). Defaults to `"auto"`.
        verbose: Passed to `fit`. Defaults to `"auto"`.

    Returns:
        The merged history: a dict of per-epoch metric lists over both phases.
    """
    check_choice("jit", jit, JIT_SETTINGS)
    backbone = model.get_layer("backbone")
    head = model.get_layer("head")
    callbacks_for = callbacks_for or (lambda phase: [])
    history = {}

    def record(result):
        for key, values in result.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)

    if epochs > 0:
        if cache_features:
            xla = jit_for(jit, backbone)
            train_features = compute_features(backbone, train, verbose, xla)
            validation_features = compute_features(backbone, validation, verbose, xla)
            compile_classifier(head, learning_rate, jit_for(jit, head))
            record(
                train_head(
                    head,
                    train_features,
                    validation_features,
                    epochs,
                    batch_size=batch_size,
                    seed=seed,
                    callbacks=callbacks_for("head"),
                    class_weight=class_weight,
                    verbose=verbose,
                )
            )
        else:
            compile_classifier(model, learning_rate, jit_for(jit, model))
            record(
                model.fit(
                    train,
                    validation_data=validation,
                    epochs=epochs,
                    callbacks=callbacks_for("head"),
                    class_weight=class_weight,
                    verbose=verbose,
                )
            )
    if fine_tune_epochs > 0:
        unfreeze_top(backbone, fine_tune_layers or default_fine_tune_layers(backbone))
        compile_classifier(model, fine_tune_learning_rate, jit_for(jit, model))
        record(
            model.fit(
                train,
                validation_data=validation,
                epochs=epochs + fine_tune_epochs,
                initial_epoch=epochs,
                callbacks=callbacks_for("fine_tune"),
                class_weight=class_weight,
                verbose=verbose,
            )
        )
        backbone.trainable = False
    return history

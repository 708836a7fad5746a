import numpy as np

from tftransfer import (
    build_classifier,
    fine_tune,
    image_folder_datasets,
    load_backbone,
    unfreeze_top,
)


def _weights(layers):
    return [w.numpy().copy() for layer in layers for w in layer.weights]


def _changed(before, after):
    return [not np.array_equal(a, b) for a, b in zip(before, after)]


def test_head_phase_trains_only_the_head_then_fine_tuning_the_top(scenes_dir):
    backbone = load_backbone("vgg16", weights=None, image_size=32)
    model = build_classifier(backbone, num_classes=3)
    network = backbone.layers[-1]
    data = image_folder_datasets(scenes_dir, image_size=32, batch_size=8)
    backbone_before = _weights(network.layers)
    head_before = _weights(model.get_layer("head").layers)
    history = fine_tune(model, data.train, data.validation, epochs=15,
                        learning_rate=0.01, jit_compile=True, verbose=0)
    assert model.get_layer("head").jit_compile  # the head trained under XLA
    assert all(not c for c in _changed(backbone_before, _weights(network.layers)))
    assert all(_changed(head_before, _weights(model.get_layer("head").layers)))
    assert history.history["val_accuracy"][-1] >= 0.9
    assert len(history.history["loss"]) == 15
    assert history.history["phase"] == ["head"] * 15

    bottom_before = _weights(network.layers[:10])
    top_before = _weights(network.layers[-4:])
    history = fine_tune(model, data.train, data.validation, epochs=0,
                        fine_tune_epochs=1, fine_tune_layers=4, jit_compile=False,
                        verbose=0)
    assert not model.jit_compile  # "auto" would have chosen XLA for VGG16 on CPU
    assert all(not c for c in _changed(bottom_before, _weights(network.layers[:10])))
    assert any(_changed(top_before, _weights(network.layers[-4:])))
    assert not backbone.trainable_weights  # frozen again afterwards


def test_unfreeze_top_keeps_batchnorm_frozen():
    backbone = load_backbone("mobilenet_v2", weights=None, image_size=32, alpha=0.35)
    unfreeze_top(backbone, 20)
    network = backbone.layers[-1]
    top = network.layers[-20:]
    assert any(layer.trainable_weights for layer in top)
    assert all(not layer.trainable for layer in top
               if layer.__class__.__name__ == "BatchNormalization")
    assert all(not layer.trainable_weights for layer in network.layers[:-20])


def test_jit_auto_follows_the_measurements_on_cpu():
    import keras
    import pytest
    import tensorflow as tf

    from tftransfer.train import jit_for

    depthwise = load_backbone("mobilenet_v2", weights=None, image_size=32, alpha=0.35)
    plain = load_backbone("vgg16", weights=None, image_size=32)
    head = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    for model in (depthwise, plain, head):
        assert jit_for("on", model) is True
        assert jit_for("off", model) is False
    if not tf.config.list_physical_devices("GPU"):
        assert jit_for("auto", depthwise) is False  # XLA ran it 6x slower here
        assert jit_for("auto", build_classifier(plain, 3)) is True
        assert jit_for("auto", head) is False
        with tf.distribute.MirroredStrategy().scope():
            mirrored = build_classifier(
                load_backbone("vgg16", weights=None, image_size=32), 3)
        # Built under a strategy: no XLA, as Keras' own auto, even outside its scope.
        assert jit_for("auto", mirrored) is False
    with pytest.raises(ValueError, match="must be one of"):
        jit_for("yes", head)


def test_fine_tuning_rate_warms_up_linearly_over_a_fraction_of_an_epoch(scenes_dir):
    import keras
    import pytest

    from tftransfer import TrainConfig

    data = image_folder_datasets(scenes_dir, image_size=32, batch_size=4)
    steps = sum(1 for _ in data.train)
    model = build_classifier(load_backbone("vgg16", weights=None, image_size=32), 3)
    rates = []

    class Rates(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            rates.append(float(self.model.optimizer.learning_rate))

    fine_tune(model, data.train, data.validation, epochs=1, fine_tune_epochs=2,
              fine_tune_layers=3, fine_tune_learning_rate=1e-3,
              fine_tune_warmup=0.5, batch_size=4, callbacks=[Rates()], verbose=0)
    warmup = round(0.5 * steps)
    head, tuned = rates[:steps], rates[steps:]
    assert head == pytest.approx([0.01] * steps)  # The head phase has none.
    assert len(tuned) == 2 * steps and warmup >= 2
    # From 0, in equal steps, to the rate; then flat.
    assert tuned[:warmup] == pytest.approx(
        [1e-3 * step / warmup for step in range(warmup)])
    assert tuned[warmup:] == pytest.approx([1e-3] * (2 * steps - warmup))

    with pytest.raises(ValueError, match="fine_tune_warmup"):
        TrainConfig(scenes_dir, backbone="vgg16", fine_tune_warmup=1.5)


def test_average_at_end_puts_the_weights_average_in_the_last_checkpoint():
    """The last epoch's end (where the checkpoint is written) already holds
    the optimizer's average, which `fit` leaves in the model; the raw weights
    before it differ."""
    import keras

    from tftransfer.train import AverageAtEnd

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seen = {}

    class Weights(keras.callbacks.Callback):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def on_epoch_end(self, epoch, logs=None):
            seen.setdefault(self.name, []).append(self.model.get_weights()[0].copy())

    model.fit(x, y, batch_size=8, epochs=3, verbose=0,
              callbacks=[Weights("raw"), AverageAtEnd(3), Weights("checkpoint")])
    final = model.get_weights()[0]
    np.testing.assert_array_equal(seen["checkpoint"][-1], final)
    assert np.abs(seen["raw"][-1] - final).max() > 1e-3
    # Before the last epoch nothing is replaced: training goes on from the raw weights.
    np.testing.assert_array_equal(seen["raw"][0], seen["checkpoint"][0])


def test_fine_tuning_keeps_the_weights_average(scenes_dir):
    """With `fine_tune_ema` the fine-tuned kernels end as the exponential
    moving average of their values after each fine-tuning step (the first
    step's value, then `m * average + (1 - m) * value`), not the last step's;
    a bad momentum is refused."""
    import keras
    import pytest

    from tftransfer import TrainConfig

    data = image_folder_datasets(scenes_dir, image_size=32, batch_size=4)
    model = build_classifier(load_backbone("vgg16", weights=None, image_size=32), 3)
    kernel = model.get_layer("backbone").get_layer("vgg16").get_layer(
        "block5_conv3").kernel
    path, momenta = [], set()

    class Path(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if getattr(self.model.optimizer, "use_ema", False):  # Fine-tuning.
                path.append(kernel.numpy().copy())
                momenta.add(self.model.optimizer.ema_momentum)

    fine_tune(model, data.train, data.validation, epochs=1, fine_tune_epochs=3,
              fine_tune_layers=3, fine_tune_learning_rate=1e-3, fine_tune_ema=0.9,
              batch_size=4, callbacks=[Path()], verbose=0)
    # At most 0.9, spanning at most a quarter of fine-tuning's steps.
    assert len(path) >= 6 and momenta == {min(0.9, 1 - 4 / len(path))}
    momentum = momenta.pop()
    average = path[0]
    for value in path[1:]:
        average = momentum * average + (1 - momentum) * value
    np.testing.assert_allclose(kernel.numpy(), average, atol=1e-6)
    assert np.abs(path[-1] - average).max() > 1e-4  # Not the last step's.
    with pytest.raises(ValueError, match="fine_tune_ema"):
        TrainConfig(scenes_dir, backbone="vgg16", fine_tune_ema=1.0)

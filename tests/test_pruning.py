"""Magnitude pruning: sparsity reached per kernel, zeros kept, resume, strip."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer.pruning import (
    MagnitudePruning,
    PruningMask,
    gzip_size,
    magnitude_mask,
    polynomial_sparsity,
    prunable_kernels,
    sparsity_report,
    strip_pruning,
)

STEPS_PER_EPOCH = 4  # 64 examples in batches of 16.


def _data(shape, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, *shape)).astype("float32")
    y = rng.integers(0, num_classes, 64)
    return x, y


def _compile(model, rate=1e-2):
    model.compile(keras.optimizers.Adam(rate),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _tiny_model(constraint=None):
    """A nested model with every prunable kind: Conv2D, DepthwiseConv2D,
    SeparableConv2D (two kernels) inside, two Dense outside."""
    body = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.DepthwiseConv2D(3, name="depthwise"),
        keras.layers.SeparableConv2D(8, 3, padding="same", name="separable"),
        keras.layers.GlobalAveragePooling2D(),
    ], name="body")
    return keras.Sequential([
        keras.Input((8, 8, 3)), body,
        keras.layers.Dense(16, kernel_constraint=constraint, name="hidden"),
        keras.layers.Dense(3, name="logits"),
    ], name="tiny")


def _zeros(variables):
    return [keras.ops.convert_to_numpy(v) == 0 for v in variables]


def _assert_sparsity(kernels, sparsity):
    for kernel in kernels:
        size = int(np.prod(kernel.shape))
        zeros = int(np.sum(keras.ops.convert_to_numpy(kernel) == 0))
        # round(s * n) zeros exactly; one more if a weight trained to 0.0.
        assert abs(zeros - round(sparsity * size)) <= 1, (kernel.path, zeros, size)


def test_schedule_rises_fast_then_slowly_and_is_clamped():
    assert polynomial_sparsity(100, 0.8, 100, 200) == 0.0
    assert polynomial_sparsity(150, 0.8, 100, 200) == pytest.approx(0.7)
    assert polynomial_sparsity(200, 0.8, 100, 200) == pytest.approx(0.8)
    assert polynomial_sparsity(0, 0.8, 100, 200) == 0.0  # Before: the start.
    assert polynomial_sparsity(10**6, 0.8, 100, 200) == pytest.approx(0.8)
    assert polynomial_sparsity(100, 0.8, 100, 200, initial_sparsity=0.5) == 0.5
    assert polynomial_sparsity(150, 0.8, 100, 200, initial_sparsity=0.5) == pytest.approx(
        0.8 - 0.3 / 8)
    steps = range(100, 201, 10)
    values = [polynomial_sparsity(t, 0.8, 100, 200) for t in steps]
    assert np.all(np.diff(values) > 0)
    assert np.all(np.diff(values, 2) < 0)  # Concave: fast first.
    with pytest.raises(ValueError, match="end_step"):
        polynomial_sparsity(0, 0.8, 100, 100)


def test_mask_zeroes_exactly_the_count_even_among_ties():
    mask = magnitude_mask(tf.ones((7, 3)), 0.8).numpy()
    assert mask.shape == (7, 3) and int(np.sum(mask == 0)) == round(0.8 * 21)
    weights = np.array([0.3, -0.1, 0.0, 2.0, -5.0, 0.0], "float32")
    np.testing.assert_array_equal(magnitude_mask(weights, 0.5).numpy(),
                                  [1, 0, 0, 1, 1, 0])


@pytest.mark.parametrize("final_sparsity", [0, 1, -0.1, 1.5, "a", None, True])
def test_bad_final_sparsity_is_refused(final_sparsity):
    with pytest.raises(ValueError, match="`final_sparsity` must be") as error:
        MagnitudePruning(final_sparsity)
    assert f"final_sparsity={final_sparsity!r}" in str(error.value)


def test_bad_steps_are_refused():
    with pytest.raises(ValueError, match="frequency=0"):
        MagnitudePruning(0.5, frequency=0)
    with pytest.raises(ValueError, match="end_step=10"):
        MagnitudePruning(0.5, begin_step=10, end_step=10)
    with pytest.raises(ValueError, match="initial_sparsity"):
        MagnitudePruning(0.5, initial_sparsity=0.6)


def test_prunable_kernels_are_the_trained_kernels_of_nested_layers():
    model = _tiny_model()
    names = [kernel.path.split("/", 1)[1] for kernel in prunable_kernels(model)]
    assert names == ["conv/kernel", "depthwise/kernel", "separable/depthwise_kernel",
                     "separable/pointwise_kernel", "hidden/kernel", "logits/kernel"]
    model.get_layer("body").trainable = False
    assert [kernel.path.split("/", 1)[1] for kernel in prunable_kernels(model)] == [
        "hidden/kernel", "logits/kernel"]
    with pytest.raises(ValueError, match="no trainable Dense or convolution"):
        model.get_layer("hidden").trainable = False
        model.get_layer("logits").trainable = False
        _compile(model).fit(*_data((8, 8, 3)), epochs=1, verbose=0,
                            callbacks=[MagnitudePruning(0.5)])


def test_mobilenet_pruned_to_the_target_with_frozen_layers_untouched():
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNet(
        weights=None, alpha=0.25, input_shape=(32, 32, 3), include_top=False,
        pooling="avg")
    for layer in backbone.layers[:-13]:  # The top two blocks train.
        layer.trainable = False
    model = _compile(keras.Sequential([keras.Input((32, 32, 3)), backbone,
                                       keras.layers.Dense(3, name="head")]), 1e-3)
    kernels = prunable_kernels(model)
    assert [k.path.split("/")[-2] for k in kernels] == [
        "conv_dw_12", "conv_pw_12", "conv_dw_13", "conv_pw_13", "head"]
    pruned = {id(kernel) for kernel in kernels}
    # BatchNormalization's statistics included: frozen, it runs in inference mode.
    frozen = [v for layer in backbone.layers[:-13] for v in layer.weights]
    frozen_before = [keras.ops.convert_to_numpy(v).copy() for v in frozen]
    x, y = _data((32, 32, 3))

    model.fit(x, y, batch_size=16, epochs=3, verbose=0,
              callbacks=[MagnitudePruning(0.8, frequency=2)])

    _assert_sparsity(kernels, 0.8)
    report = sparsity_report(kernels)
    assert [layer["layer"] for layer in report["layers"]][-1] == "head"
    assert report["total"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    for variable, before in zip(frozen, frozen_before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), before,
                                      err_msg=variable.path)
    unpruned = [v for v in model.trainable_variables if id(v) not in pruned]
    assert len(unpruned) == 9  # BatchNorm's gamma and beta, the head's bias.
    for variable in unpruned:
        # A channel whose kernel is pruned whole feeds its BatchNormalization
        # a constant, and its ReLU a dead beta: a few zeros, not 80%.
        zeros = np.mean(keras.ops.convert_to_numpy(variable) == 0)
        assert zeros < 0.3, (variable.path, zeros)
    assert np.all(keras.ops.convert_to_numpy(model.get_layer("head").bias) != 0)
    assert all(v.constraint is None for v in model.variables)

    # Masks fixed (their end step is past): the zeros stay through more
    # training, while the other weights move. (Little below the head: the
    # random frozen bottom gives the top tiny gradients.)
    zeros = _zeros(kernels)
    head = keras.ops.convert_to_numpy(model.get_layer("head").kernel).copy()
    assert int(model.optimizer.iterations) == 3 * STEPS_PER_EPOCH
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[MagnitudePruning(0.8, end_step=1)])
    for kernel, zero in zip(kernels, zeros):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(kernel) == 0, zero,
                                      err_msg=kernel.path)
    assert not np.allclose(keras.ops.convert_to_numpy(model.get_layer("head").kernel),
                           head)


def test_constraint_keeps_zeros_between_updates_after_an_earlier_fit():
    keras.utils.set_random_seed(1)
    model = _compile(_tiny_model())
    x, y = _data((8, 8, 3))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # Traced without masks.
    kernels = prunable_kernels(model)
    seen = []
    # One update at the start (initial_sparsity), none until the end.
    pruning = MagnitudePruning(0.6, initial_sparsity=0.5, end_step=10**6,
                               frequency=10**6)
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(_zeros(kernels)))
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[pruning, record])
    for kernel, first, last in zip(kernels, seen[0], seen[-1]):
        assert first.mean() == pytest.approx(0.5, abs=1 / first.size), kernel.path
        np.testing.assert_array_equal(first, last, err_msg=kernel.path)


def test_resume_from_saved_weights_keeps_the_zeros_and_reaches_the_target(tmp_path):
    keras.utils.set_random_seed(2)
    x, y = _data((8, 8, 3))
    total = 4 * STEPS_PER_EPOCH
    model = _compile(_tiny_model())
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[MagnitudePruning(0.8, end_step=total, frequency=2)])
    halfway = polynomial_sparsity(total // 2, 0.8, 0, total)
    assert halfway == pytest.approx(0.7)
    _assert_sparsity(prunable_kernels(model), halfway)
    zeros = _zeros(prunable_kernels(model))
    path = str(tmp_path / "half.weights.h5")
    model.save_weights(path)

    fresh = _compile(_tiny_model())
    fresh.optimizer.build(fresh.trainable_variables)  # So its state loads too.
    fresh.load_weights(path)
    assert int(fresh.optimizer.iterations) == total // 2
    kernels = prunable_kernels(fresh)
    at_start = []
    # At the first step, after the pruning callback's update for it.
    check = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: at_start or at_start.append(
            _zeros(kernels)))
    fresh.fit(x, y, batch_size=16, epochs=4, initial_epoch=2, verbose=0,
              callbacks=[MagnitudePruning(0.8, frequency=2), check])

    for kernel, before, start in zip(kernels, zeros, at_start[0]):
        np.testing.assert_array_equal(start, before, err_msg=kernel.path)  # No jump.
        after = keras.ops.convert_to_numpy(kernel) == 0
        assert np.all(after[before]), kernel.path  # Pruned then, pruned now.
    _assert_sparsity(kernels, 0.8)


def test_a_later_phase_with_a_new_optimizer_reaches_the_target_at_its_end():
    # As fine-tuning after the head's epochs: initial_epoch=2, iterations from 0.
    keras.utils.set_random_seed(5)
    model = _compile(_tiny_model())
    kernels = prunable_kernels(model)
    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(
        sparsity_report(kernels)["total"]["sparsity"]))
    model.fit(*_data((8, 8, 3)), batch_size=16, epochs=4, initial_epoch=2, verbose=0,
              callbacks=[MagnitudePruning(0.8, frequency=1), record])
    # After the first of two epochs the update of step 3 (of 8) is in force.
    assert seen[0] == pytest.approx(polynomial_sparsity(3, 0.8, 0, 8), abs=0.02)
    _assert_sparsity(kernels, 0.8)
    # A pruning that would begin after the fit ends is refused, masks removed.
    with pytest.raises(ValueError, match="begin_step=100"):
        model.fit(*_data((8, 8, 3)), batch_size=16, epochs=1, verbose=0,
                  callbacks=[MagnitudePruning(0.8, begin_step=100)])
    assert all(v.constraint is None for v in model.variables)


def test_stripped_model_saves_and_loads_without_custom_objects(tmp_path):
    keras.utils.set_random_seed(3)
    model = _compile(_tiny_model(constraint=keras.constraints.NonNeg()))
    x, y = _data((8, 8, 3))
    hidden = model.get_layer("hidden").kernel
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(hidden.constraint))
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[MagnitudePruning(0.7, frequency=1), record])
    # While pruning, the layer's own constraint applied under the mask.
    assert isinstance(seen[0], PruningMask)
    assert isinstance(seen[0].previous, keras.constraints.NonNeg)
    assert np.all(keras.ops.convert_to_numpy(hidden) >= 0)
    assert isinstance(hidden.constraint, keras.constraints.NonNeg)
    assert all(v.constraint is None for v in model.variables if v is not hidden)
    assert model.train_function is None  # Its traced masks are dropped.

    path = str(tmp_path / "x.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-6)
    for original, copy in zip(prunable_kernels(model), prunable_kernels(loaded)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(copy) == 0,
                                      keras.ops.convert_to_numpy(original) == 0)
    _assert_sparsity(prunable_kernels(loaded), 0.7)
    # Loaded layers are named alike, their variables' paths without the model's.
    assert ([(layer["layer"], layer["sparsity"]) for layer in sparsity_report(loaded)["layers"]]
            == [(layer["layer"], layer["sparsity"]) for layer in sparsity_report(model)["layers"]])


def test_explicit_kernels_through_a_wrapper_sharing_layers():
    keras.utils.set_random_seed(4)
    network = _tiny_model()
    inputs = keras.Input((8, 8, 3))
    wrapper = _compile(keras.Model(inputs, keras.layers.Dense(3, name="extra")(
        network(inputs)), name="wrapper"))
    kernels = prunable_kernels(network)
    wrapper.fit(*_data((8, 8, 3)), batch_size=16, epochs=2, verbose=0,
                callbacks=[MagnitudePruning(0.5, frequency=2, kernels=kernels)])
    _assert_sparsity(kernels, 0.5)  # In `network`: the variables are shared.
    extra = sparsity_report(wrapper)["layers"][-1]
    assert extra["layer"] == "extra" and extra["sparsity"] == 0.0
    # Pruning the same kernels twice at once is refused.
    kernels[0].constraint = PruningMask(kernels[0].shape)
    with pytest.raises(ValueError, match="pruned already"):
        wrapper.fit(*_data((8, 8, 3)), epochs=1, verbose=0,
                    callbacks=[MagnitudePruning(0.5, kernels=kernels)])
    strip_pruning(network)
    assert all(v.constraint is None for v in wrapper.variables)


def test_gzip_size_of_files_and_folders(tmp_path):
    folder = tmp_path / "saved"
    (folder / "variables").mkdir(parents=True)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=20_000).astype("float32")
    (folder / "variables" / "data").write_bytes(noise.tobytes())
    (folder / "saved_model.pb").write_bytes(b"graph" * 100)
    size = gzip_size(folder)
    assert 0.8 * noise.nbytes < size < noise.nbytes
    os.utime(folder / "saved_model.pb", (0, 0))
    assert gzip_size(str(folder)) == size  # Times are not counted.
    pruned = noise * (np.abs(noise) > np.quantile(np.abs(noise), 0.8))
    (tmp_path / "pruned.bin").write_bytes(pruned.tobytes())
    (tmp_path / "dense.bin").write_bytes(noise.tobytes())
    assert gzip_size(tmp_path / "pruned.bin") < 0.5 * gzip_size(tmp_path / "dense.bin")
    with pytest.raises(FileNotFoundError, match="missing"):
        gzip_size(tmp_path / "missing")

"""Layer-wise reconstruction of pruned kernels: closer to the dense network,
zeros kept, only pointwise kernels, and `--prune` uses it on MobileNet."""

import keras
import numpy as np
import pytest

from tftransfer import TrainConfig
from tftransfer.backbones import load_backbone
from tftransfer.filter_pruning import prune_filters, refit_pruned_filters
from tftransfer.graph import backbone_network, split_backbone
from tftransfer.pruning import magnitude_mask
from tftransfer.reconstruction import DenseTargets, reconstruct, reconstructable
from tftransfer.run import train_run


def _top(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = load_backbone("mobilenet", weights=None, image_size=32, alpha=0.25)
    _, top = split_backbone(backbone, 13)  # The top two blocks.
    # A random network's activations vanish: these stand in for ReLU6 outputs.
    shape = (96, *top.input.shape[1:])
    return top, np.random.default_rng(seed).uniform(0, 6, shape).astype("float32")


def _pointwise(top):
    return [layer for layer in top.layers if reconstructable(layer)]


def test_refit_is_closer_to_the_dense_outputs_and_keeps_the_zeros():
    top, inputs = _top()
    layers = _pointwise(top)
    assert [layer.name for layer in layers] == ["conv_pw_12", "conv_pw_13"]
    dense = top(inputs, training=False).numpy()
    targets = DenseTargets(top, layers, inputs)
    for layer in layers:
        layer.kernel.assign(layer.kernel * magnitude_mask(layer.kernel, 0.8))
    zeros = [layer.kernel.numpy() == 0 for layer in layers]
    masked = top(inputs, training=False).numpy()

    errors = reconstruct(targets)

    refitted = top(inputs, training=False).numpy()
    assert len(errors) == 2
    for before, after in errors:
        assert after < 0.8 * before, errors  # Each layer's output is refitted.
    for layer, zero in zip(layers, zeros):
        kernel = layer.kernel.numpy()
        np.testing.assert_array_equal(kernel == 0, zero)  # Pruned stays pruned.
        assert abs(np.mean(kernel == 0) - 0.8) <= 0.01
    # The network's output, not only each layer's, moves towards the dense one.
    assert (np.linalg.norm(refitted - dense)
            < 0.8 * np.linalg.norm(masked - dense))


def test_dense_layers_with_bias_and_activation_are_refitted_before_it():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden(inputs)))
    x = np.random.default_rng(1).normal(size=(64, 12)).astype("float32")
    targets = DenseTargets(model, [hidden], x)
    expected = x @ hidden.kernel.numpy() + hidden.bias.numpy()
    np.testing.assert_allclose(targets.targets[0], expected[targets.rows[0]], atol=1e-5)
    hidden.kernel.assign(hidden.kernel * magnitude_mask(hidden.kernel, 0.5))
    ((before, after),) = reconstruct(targets)
    assert after < before
    assert abs(np.mean(hidden.kernel.numpy() == 0) - 0.5) <= 0.01


def test_only_pointwise_kernels_are_refitted():
    top, inputs = _top()
    depthwise = top.get_layer("conv_dw_13")
    assert not reconstructable(depthwise)
    assert not reconstructable(keras.layers.Conv2D(4, 3))
    with pytest.raises(ValueError, match="1x1 Conv2D"):
        DenseTargets(top, [depthwise], inputs)


def test_train_prune_of_mobilenet_refits_on_cached_activations(scenes_dir, tmp_path):
    """`--prune` on a MobileNet top (pointwise kernels) records the refit of
    each pruned layer at the final sparsity, and reaches the sparsity."""
    result = train_run(TrainConfig(
        scenes_dir, output=str(tmp_path / "run"), backbone="mobilenet", alpha=0.25,
        weights=None, image_size=32, epochs=1, fine_tune_epochs=2,
        fine_tune_layers=13, prune=0.8, cache_dir=str(tmp_path / "cache"),
        report=False, verbose=0))
    pruning = result.summary["pruning"]
    record = pruning["reconstruction"]
    assert record["layers"] == ["conv_pw_12", "conv_pw_13"]
    assert record["sparsity"] == 0.8
    assert all(after <= before for before, after in zip(
        record["relative_error_before"], record["relative_error_after"]))
    assert all(abs(row["sparsity"] - 0.8) <= 0.01 for row in pruning["layers"])


def test_narrowed_convolutions_are_refitted_to_the_full_network():
    keras.utils.set_random_seed(0)
    backbone = load_backbone("mobilenet", weights=None, image_size=32, alpha=0.25)
    pruned, _ = prune_filters(backbone, 0.5, 26)
    pixels = np.random.default_rng(0).uniform(0, 255, (64, 32, 32, 3)).astype("float32")
    dense = backbone(pixels, training=False).numpy()
    narrowed = pruned(pixels, training=False).numpy()
    unchanged = {layer.name: [w.copy() for w in layer.get_weights()]
                 for layer in backbone_network(pruned).layers}

    record = refit_pruned_filters(backbone, pruned, 0.5, 26, pixels)

    # The convolutions that lost input channels, not conv_pw_10 (it lost outputs only).
    assert [row["layer"] for row in record] == ["conv_pw_11", "conv_pw_12", "conv_pw_13"]
    for row in record:
        assert row["relative_error_after"] < 0.8 * row["relative_error_before"], record
    refitted = pruned(pixels, training=False).numpy()
    assert (np.linalg.norm(refitted - dense) < 0.8 * np.linalg.norm(narrowed - dense))
    for layer in backbone_network(pruned).layers:
        same = all(np.array_equal(a, b) for a, b in zip(layer.get_weights(),
                                                       unchanged[layer.name]))
        assert same == (layer.name not in {row["layer"] for row in record}), layer.name


def test_a_vgg_top_is_not_refitted():
    keras.utils.set_random_seed(0)
    backbone = load_backbone("vgg16", weights=None, image_size=32)
    pruned, _ = prune_filters(backbone, 0.5, 4)
    pixels = np.zeros((4, 32, 32, 3), "float32")
    assert refit_pruned_filters(backbone, pruned, 0.5, 4, pixels) is None


def test_train_prune_filters_refits_mobilenet_before_the_features(scenes_dir, tmp_path):
    result = train_run(TrainConfig(
        scenes_dir, output=str(tmp_path / "run"), backbone="mobilenet", alpha=0.25,
        weights=None, image_size=32, epochs=1, fine_tune_epochs=1,
        fine_tune_layers=26, prune_filters=0.5, cache_dir=str(tmp_path / "cache"),
        report=False, verbose=0))
    record = result.summary["filter_pruning"]["refit"]
    assert [row["layer"] for row in record] == ["conv_pw_11", "conv_pw_12", "conv_pw_13"]
    assert all(row["relative_error_after"] < row["relative_error_before"]
               for row in record)
    assert result.summary["timings"]["refit"] > 0

"""filter_pruning: narrower convolutions that keep the surviving weights."""

import keras
import numpy as np
import pytest
from test_hub import write_hub_module

from tftransfer import build_classifier, load_backbone, unfreeze_top
from tftransfer.filter_pruning import prune_filters
from tftransfer.graph import backbone_network


def _pixels(count=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (count, size, size, 3)).astype("float32")


def _filters(network):
    return {layer.name: layer.kernel.shape[-2:] for layer in network.layers
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))}


def test_vgg16_top_convolutions_lose_half_their_filters_and_still_train():
    backbone = load_backbone("vgg16", weights=None, image_size=32)
    pruned, removed = prune_filters(backbone, fraction=0.5, num_layers=6)

    assert removed == [
        {"layer": "block5_conv1", "filters_before": 512, "filters_after": 256},
        {"layer": "block5_conv2", "filters_before": 512, "filters_after": 256},
    ]
    network = backbone_network(pruned)
    assert [layer.name for layer in pruned.layers] == ["pixels", "preprocessing", "vgg16"]
    assert [layer.name for layer in network.layers] == [
        layer.name for layer in backbone_network(backbone).layers]
    filters = _filters(network)
    assert filters["block4_conv3"] == (512, 512)  # Below the top: untouched.
    assert filters["block5_conv1"] == (512, 256)
    assert filters["block5_conv2"] == (256, 256)
    assert filters["block5_conv3"] == (256, 512)  # The last keeps its outputs.
    assert pruned.output_shape == backbone.output_shape == (None, 512)
    assert _filters(backbone_network(backbone))["block5_conv1"] == (512, 512)
    assert pruned.count_params() < backbone.count_params()
    assert np.isfinite(pruned(_pixels(), training=False)).all()

    # Frozen like the backbone given, and fine-tuned the same way.
    assert not pruned.trainable_weights
    assert unfreeze_top(pruned, 6) == 3
    model = build_classifier(pruned, num_classes=2)
    model.compile(keras.optimizers.Adam(1e-4),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    kernel = network.get_layer("block5_conv2").kernel.numpy().copy()
    labels = np.array([0, 1, 0, 1])
    history = model.fit(_pixels(), labels, epochs=8, batch_size=4, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert not np.array_equal(kernel, network.get_layer("block5_conv2").kernel.numpy())


def test_vgg16_pruning_filters_that_are_zero_keeps_the_outputs():
    # A plain Keras Applications network, not wrapped by load_backbone.
    network = keras.applications.VGG16(include_top=False, weights=None,
                                       input_shape=(32, 32, 3), pooling="avg")
    rng = np.random.default_rng(1)
    for name in ("block5_conv1", "block5_conv2"):
        layer = network.get_layer(name)
        kernel, bias = layer.get_weights()
        bias = rng.normal(0, 0.1, bias.shape).astype("float32")
        # Zero filters have the smallest L1 norm, and ReLU(0) = 0 feeds the
        # next convolution nothing: removing them changes no output.
        zeroed = rng.choice(512, 256, replace=False)
        kernel[..., zeroed] = 0
        bias[zeroed] = 0
        layer.set_weights([kernel, bias])
    pixels = _pixels(seed=2) - 128
    expected = network(pixels, training=False).numpy()

    pruned, removed = prune_filters(network, fraction=0.5, num_layers=6)

    assert isinstance(pruned, keras.Model) and pruned.name == network.name
    assert [row["filters_after"] for row in removed] == [256, 256]
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(pruned(pixels, training=False), expected,
                               rtol=1e-5, atol=1e-5)


def test_mobilenet_pointwise_filters_go_and_depthwise_channels_follow():
    backbone = load_backbone("mobilenet", weights=None, image_size=32, alpha=0.25)
    num_layers = int(0.3 * len(backbone_network(backbone).layers))
    pruned, removed = prune_filters(backbone, fraction=0.5, num_layers=num_layers)

    assert [(row["layer"], row["filters_before"], row["filters_after"])
            for row in removed] == [
        ("conv_pw_10", 128, 64), ("conv_dw_11", 128, 64),
        ("conv_pw_11", 128, 64), ("conv_dw_12", 128, 64),
        ("conv_pw_12", 256, 128), ("conv_dw_13", 256, 128),
    ]
    network = backbone_network(pruned)
    filters = _filters(network)
    assert filters["conv_pw_9"] == (128, 128)
    assert filters["conv_dw_10"] == (128, 1)
    assert filters["conv_dw_11"] == (64, 1)
    assert filters["conv_pw_12"] == (64, 128)
    assert filters["conv_dw_13"] == (128, 1)
    assert filters["conv_pw_13"] == (128, 256)
    assert network.get_layer("conv_pw_12_bn").moving_variance.shape == (128,)
    assert pruned.output_shape == (None, 256)
    assert np.isfinite(pruned(_pixels(), training=False)).all()


def test_mobilenet_pruning_channels_that_are_zero_keeps_the_outputs():
    backbone = load_backbone("mobilenet", weights=None, image_size=32, alpha=0.25)
    network = backbone_network(backbone)
    rng = np.random.default_rng(3)
    # Statistics of every BatchNormalization made distinct, so that copying
    # the wrong channels would show.
    for layer in network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, size), rng.normal(0, 0.1, size),
                               rng.normal(0, 0.1, size), rng.uniform(0.5, 1.5, size)])
    survivors = {}
    for index in (10, 11, 12):
        layer = network.get_layer(f"conv_pw_{index}")
        (kernel,) = layer.get_weights()
        zeroed = rng.choice(kernel.shape[-1], kernel.shape[-1] // 2, replace=False)
        kernel[..., zeroed] = 0
        layer.set_weights([kernel])
        survivors[layer.name] = np.setdiff1d(np.arange(kernel.shape[-1]), zeroed)
        # Gamma and beta at 0 make those channels exactly 0 after each
        # BatchNormalization, through the depthwise convolution to the next one.
        for name in (f"conv_pw_{index}_bn", f"conv_dw_{index + 1}_bn"):
            norm = network.get_layer(name)
            gamma, beta, mean, variance = norm.get_weights()
            gamma[zeroed] = beta[zeroed] = 0
            norm.set_weights([gamma, beta, mean, variance])
    pixels = _pixels(seed=4)
    expected = backbone(pixels, training=False).numpy()

    pruned, removed = prune_filters(backbone, fraction=0.5, num_layers=26)

    assert len(removed) == 6
    pruned_network = backbone_network(pruned)
    kept_inputs = slice(None)
    for name, kept in survivors.items():
        kernel = network.get_layer(name).kernel.numpy()[:, :, kept_inputs][..., kept]
        np.testing.assert_array_equal(pruned_network.get_layer(name).kernel, kernel)
        kept_inputs = kept
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(pruned(pixels, training=False), expected,
                               rtol=1e-5, atol=1e-5)


def test_networks_with_branches_are_refused_by_layer_name():
    resnet = load_backbone("resnet50", weights=None, image_size=32)
    with pytest.raises(ValueError, match=r"`conv5_block3_add` \(Add\) joins 2 "
                       r"branches in the top 20 layers of resnet50|"
                       r"top 20 layers of resnet50.*`conv5_block3_add` \(Add\)"):
        prune_filters(resnet, fraction=0.5, num_layers=20)
    mobilenet_v2 = load_backbone("mobilenet_v2", weights=None, image_size=32,
                                 alpha=0.35)
    with pytest.raises(ValueError, match=r"`block_15_add` \(Add\) joins 2 branches"):
        prune_filters(mobilenet_v2, fraction=0.5, num_layers=46)
    # Its top block, below the last join, is a chain.
    pruned, removed = prune_filters(mobilenet_v2, fraction=0.5, num_layers=12)
    assert [row["layer"] for row in removed] == [
        "block_16_expand", "block_16_depthwise", "block_16_project"]
    assert pruned.output_shape == (None, 1280)


def test_hub_modules_and_classifiers_are_refused(tmp_path):
    module = write_hub_module(tmp_path / "module")
    backbone = load_backbone(f"hub:{module}", image_size=32)
    with pytest.raises(ValueError, match="one opaque layer"):
        prune_filters(backbone, fraction=0.5, num_layers=1)
    classifier = build_classifier(
        load_backbone("mobilenet", weights=None, image_size=32, alpha=0.25), 2)
    with pytest.raises(ValueError, match=r"model.get_layer\('backbone'\)"):
        prune_filters(classifier, fraction=0.5, num_layers=26)


@pytest.mark.parametrize("fraction, num_layers, error, message", [
    (0, 6, ValueError, r"`fraction` must be between 0 and 1.*Received: fraction=0"),
    (1.0, 6, ValueError, r"Received: fraction=1.0"),
    (-0.5, 6, ValueError, r"Received: fraction=-0.5"),
    ("half", 6, TypeError, r"`fraction` must be a number"),
    (0.5, 0, ValueError, r"`num_layers` must be at least 1. Received: num_layers=0"),
    (0.5, 21, ValueError, r"between 1 and 20 for vgg16. Received: num_layers=21"),
    (0.5, 3, ValueError, r"no convolution to prune.*Received: num_layers=3"),
])
def test_bad_arguments_are_refused(fraction, num_layers, error, message):
    backbone = load_backbone("vgg16", weights=None, image_size=32)
    with pytest.raises(error, match=message):
        prune_filters(backbone, fraction=fraction, num_layers=num_layers)

import os

import keras
import numpy as np
import pytest
from conftest import run_cli

from tftransfer import (
    BackboneSpec,
    backbone_names,
    backbones,
    get_backbone_spec,
    load_backbone,
    register_backbone,
)

REQUIRED = {
    "vgg16", "vgg19", "resnet50", "resnet50_v2", "resnet101", "mobilenet",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
    "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_v2_b0",
    "efficientnet_v2_s", "densenet121", "xception", "inception_v3", "convnext_tiny",
}


def test_registry_holds_the_required_backbones():
    assert REQUIRED <= set(backbone_names())


@pytest.mark.parametrize("name", backbone_names())
def test_every_backbone_builds_frozen_and_yields_features(name):
    spec = get_backbone_spec(name)
    size = max(32, spec.min_image_size)
    backbone = load_backbone(name, weights=None, image_size=size)
    assert backbone.input_shape == (None, size, size, 3)
    assert not backbone.trainable_weights
    pixels = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3))
    features = backbone(pixels.astype("float32"), training=False).numpy()
    assert features.shape == (2, backbone.output_shape[-1])
    assert np.isfinite(features).all()


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="Expected one of: .*mobilenet_v2"):
        load_backbone("mobilenet_v9", weights=None)


def test_alpha_only_for_mobilenets_and_size_checked():
    with pytest.raises(ValueError, match="alpha"):
        load_backbone("resnet50", weights=None, alpha=0.5)
    with pytest.raises(ValueError, match="image_size"):
        load_backbone("xception", weights=None, image_size=32)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_backbone("vgg16", weights=str(tmp_path / "missing.h5"), image_size=32)


def test_weights_from_a_file_the_test_writes(tmp_path):
    source = keras.applications.VGG16(include_top=False, weights=None,
                                      input_shape=(32, 32, 3), pooling="avg")
    path = str(tmp_path / "vgg16.weights.h5")
    source.save_weights(path)
    backbone = load_backbone("vgg16", weights=path, image_size=32)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = source(keras.applications.vgg16.preprocess_input(pixels.copy()))
    np.testing.assert_allclose(backbone(pixels), expected, rtol=1e-5, atol=1e-5)


def test_offline_imagenet_weights_fail_clearly_from_the_cli(tmp_path, scenes_dir):
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "empty_keras_home")}
    result = run_cli("train", scenes_dir, "--output", str(tmp_path / "run"),
                     "--backbone", "resnet50", "--image-size", "32", env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in result.stderr
    assert str(tmp_path / "empty_keras_home" / "models") in result.stderr
    assert "--weights none" in result.stderr and "--weights PATH" in result.stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.fixture
def registry():
    """The backbone registry, restored after the test."""
    saved = dict(backbones._REGISTRY)
    yield backbones._REGISTRY
    backbones._REGISTRY.clear()
    backbones._REGISTRY.update(saved)


def test_custom_backbone_is_found_by_any_case(registry):
    spec = register_backbone(BackboneSpec("MyNet", "MobileNetV2", "tf",
                                          has_alpha=True))
    assert spec.name == "mynet" and "mynet" in backbone_names()
    assert "MyNet" not in registry
    for name in ("MyNet", "mynet", "MYNET"):
        assert get_backbone_spec(name) is spec
    backbone = load_backbone("MyNet", weights=None, image_size=32, alpha=0.35)
    assert backbone.output_shape == (None, 1280)
    dashed = register_backbone(BackboneSpec("Tiny-Net", "VGG16", "caffe"))
    assert dashed.name == "tiny_net" and get_backbone_spec("TINY-NET") is dashed


def test_duplicate_backbone_is_refused_unless_overwritten(registry):
    first = register_backbone(BackboneSpec("MyNet", "MobileNetV2", "tf"))
    with pytest.raises(ValueError, match="'mynet' is already registered.*"
                                         "`overwrite=True`"):
        register_backbone(BackboneSpec("MYNET", "VGG16", "caffe"))
    assert get_backbone_spec("mynet") is first
    with pytest.raises(ValueError, match="'resnet50' is already registered"):
        register_backbone(BackboneSpec("ResNet50", "VGG16", "caffe"))
    second = register_backbone(BackboneSpec("MYNET", "VGG16", "caffe"),
                               overwrite=True)
    assert get_backbone_spec("MyNet") is second and second.constructor == "VGG16"
    assert list(registry).count("mynet") == 1


def test_bad_registrations_are_refused(registry):
    before = dict(registry)
    with pytest.raises(TypeError, match="BackboneSpec"):
        register_backbone("mynet")
    with pytest.raises(ValueError, match="hub:"):
        register_backbone(BackboneSpec("hub:mine", "VGG16", "caffe"))
    with pytest.raises(ValueError, match="preprocessing"):
        register_backbone(BackboneSpec("mine", "VGG16", "bgr"))
    assert registry == before


@pytest.mark.parametrize("name", backbone_names())
def test_layer_counts_match_the_networks_load_backbone_builds(name):
    """`fine_tune_layers` is checked against NUM_LAYERS without building: each
    entry must be what `unfreeze_top` will count."""
    from tftransfer.graph import NUM_LAYERS, backbone_network, count_network_layers

    spec = get_backbone_spec(name)
    # MobileNetV3 takes 0.75 or 1.0; the others any width.
    alpha = (0.75 if name.startswith("mobilenet_v3") else 0.5) if spec.has_alpha else None
    size = max(spec.min_image_size, 32)
    built = len(backbone_network(load_backbone(name, None, size, alpha)).layers)
    assert NUM_LAYERS[spec.constructor] == built
    assert count_network_layers(name, alpha) == built


def test_construct_loaded_creates_each_variable_holding_its_file_value(tmp_path):
    from tftransfer.backbones import construct_loaded

    options = dict(include_top=False, input_shape=(32, 32, 3), alpha=0.35)
    reference = keras.applications.MobileNetV2(weights=None, **options)
    rng = np.random.default_rng(0)
    for variable in reference.variables:  # Not the initializers' values.
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    path = str(tmp_path / "mobilenet_v2.weights.h5")
    reference.save_weights(path)
    built = construct_loaded(keras.applications.MobileNetV2, weights=path, **options)
    assert len(built.variables) == len(reference.variables) == 260
    for mine, theirs in zip(built.variables, reference.variables):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    pixels = rng.uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(built(pixels), reference(pixels), atol=1e-5)
    # With no file, each variable holds its initializer's value, as built by Keras.
    random = construct_loaded(keras.applications.MobileNetV2, weights=None, **options)
    assert np.std(random.get_layer("Conv1").kernel.numpy()) > 0


def test_construct_loaded_leaves_no_variable_uninitialized_when_it_fails():
    from keras.src.backend.common import global_state

    from tftransfer.backbones import construct_loaded

    def failing(**options):
        keras.layers.Dense(2).build((None, 3))
        raise OSError("no weights file")

    with pytest.raises(OSError, match="no weights file"):
        construct_loaded(failing)
    assert not global_state.get_global_attribute("uninitialized_variables")

"""Feature fusion: `train --backbone a,b` and `build_fused_classifier`."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import shared_path

from tftransfer import (
    ServedModel,
    TrainConfig,
    build_fused_classifier,
    decode_image,
    export_saved_model,
    fine_tune,
    train_run,
)
from tftransfer.fusion import fused_members, parse_backbones

MEMBERS = "mobilenet_v2:alpha=0.35:size=32,vgg16:size=48"
FAST = dict(weights=None, batch_size=8, report=False, verbose=0)


def _run(data, output, backbone, cache_dir, **options):
    return train_run(TrainConfig(data, output=str(output), backbone=backbone,
                                 cache_dir=str(cache_dir), **{**FAST, **options}))


@pytest.fixture(scope="module")
def fused_after_singles(scenes_dir, tmp_path_factory):
    """Both members' single runs, then their fusion, sharing one cache."""
    folder = tmp_path_factory.mktemp("fusion")
    singles = [_run(scenes_dir, folder / f"single{i}", member, folder / "cache",
                    epochs=2)
               for i, member in enumerate(MEMBERS.split(","))]
    fused = _run(scenes_dir, folder / "fused", MEMBERS, folder / "cache", epochs=6)
    return singles, fused


def test_a_fusion_after_its_single_runs_runs_no_backbone(fused_after_singles):
    singles, fused = fused_after_singles
    for single in singles:
        assert single.summary["features"]["computed"] == 48  # 16 images x 3 classes
    assert fused.summary["features"] == {"hits": 96, "computed": 0, "rebuilt": 0}
    assert fused.summary["backbone"] == MEMBERS
    assert fused.summary["image_size"] == 48  # The larger member's.
    members = fused_members(fused.model.get_layer("backbone"))
    assert [m.input_shape[1] for m in members] == [32, 48]
    # Each member's features are normalised to the same length before the head.
    assert fused.model.get_layer("head").input_shape == (None, 1280 + 512)


def test_the_fused_saved_model_matches_the_model_by_bytes_and_pixels(
        fused_after_singles, scenes_dir, tmp_path):
    _, fused = fused_after_singles
    paths = [os.path.join(root, name) for root, _, names in os.walk(scenes_dir)
             for name in sorted(names)][:6]
    images = [open(path, "rb").read() for path in paths]
    pixels = tf.stack([decode_image(image, 48) for image in images])
    # The run's own export and model.keras, which hold the trained network.
    expected = tf.nn.softmax(fused.model(pixels, training=False)).numpy()
    served = ServedModel(os.path.join(fused.path, "saved_model"))
    np.testing.assert_allclose(served.predict_bytes(images), expected, atol=1e-4)
    reloaded = keras.saving.load_model(os.path.join(fused.path, "model.keras"))
    np.testing.assert_allclose(tf.nn.softmax(reloaded(pixels)).numpy(), expected,
                               atol=1e-5)
    # Random-weight members barely tell images apart, so the trained head is
    # nearly constant: a head with large random weights makes outputs differ.
    model = build_fused_classifier(MEMBERS.split(","), 3, weights=None)
    kernel = model.get_layer("head").layers[-1].kernel
    kernel.assign(np.random.default_rng(0).normal(0, 0.05, kernel.shape).astype("float32"))
    expected = tf.nn.softmax(model(pixels, training=False)).numpy()
    assert expected.std(axis=0).max() > 1e-3
    loaded = tf.saved_model.load(export_saved_model(model, str(tmp_path / "sm"),
                                                    ["a", "b", "c"]))
    from_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant(images))
    np.testing.assert_allclose(from_bytes["probabilities"], expected, atol=1e-4)
    from_pixels = loaded.signatures["serve_pixels"](images=pixels)
    np.testing.assert_allclose(from_pixels["probabilities"], expected, atol=1e-4)


def test_fine_tuning_a_fusion_trains_the_top_of_each_member(scenes_dir):
    model = build_fused_classifier(["mobilenet_v2:alpha=0.35:size=32", "vgg16"], 3,
                                   weights=None, image_size=48)
    members = fused_members(model.get_layer("backbone"))
    before = [[w.numpy().copy() for w in member.weights] for member in members]
    datasets = [keras.utils.image_dataset_from_directory(
        scenes_dir, image_size=(48, 48), batch_size=8, shuffle=False,
        validation_split=0.25, subset=subset, seed=0)
        for subset in ("training", "validation")]
    history = fine_tune(model, *datasets, epochs=1, fine_tune_epochs=1,
                        fine_tune_layers=4, verbose=0)
    assert history.history["phase"] == ["head", "fine_tune"]
    for member, old in zip(members, before):
        changed = [not np.array_equal(w.numpy(), o) for w, o in zip(member.weights, old)]
        # The top 4 layers moved (VGG16: 3 convolutions; MobileNetV2: Conv_1,
        # its BatchNormalization frozen), the rest did not.
        assert any(changed[-8:])
        assert not any(changed[:-10])
    assert not model.get_layer("backbone").trainable_weights  # Frozen again.


def test_fusion_settings_are_checked_by_name(scenes_dir):
    members = parse_backbones("mobilenet:alpha=0.25,mobilenet_v2", image_size=96)
    assert [(m.name, m.alpha, m.image_size) for m in members] == [
        ("mobilenet", 0.25, 96), ("mobilenet_v2", None, 96)]
    with pytest.raises(ValueError, match="at least two backbones"):
        TrainConfig(scenes_dir, backbone="vgg16,", weights=None)
    with pytest.raises(ValueError, match="Unknown option 'depth'"):
        TrainConfig(scenes_dir, backbone="vgg16:depth=2,mobilenet", weights=None)
    with pytest.raises(ValueError, match="Unknown backbone 'vgg17'"):
        TrainConfig(scenes_dir, backbone="vgg17,mobilenet", weights=None)
    with pytest.raises(ValueError, match="NAME:alpha=A"):
        TrainConfig(scenes_dir, backbone="vgg16,mobilenet", alpha=0.5, weights=None)
    with pytest.raises(ValueError, match="NAME:weights=PATH"):
        TrainConfig(scenes_dir, backbone="vgg16,mobilenet", weights=__file__)
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(scenes_dir, backbone="vgg16,mobilenet", lr_decay=0.5, weights=None)
    # One member's form works for one backbone too, unless it contradicts.
    config = TrainConfig(scenes_dir, backbone="mobilenet:alpha=0.25:size=64",
                         weights=None)
    assert (config.backbone, config.alpha, config.image_size) == ("mobilenet", 0.25, 64)
    with pytest.raises(ValueError, match="give it once"):
        TrainConfig(scenes_dir, backbone="mobilenet:alpha=0.25", alpha=0.5)
    config = TrainConfig(scenes_dir, backbone="vgg16:size=40,mobilenet", image_size=64,
                         weights=None)
    assert config.backbone == "vgg16:size=40,mobilenet:size=64"
    assert config.image_size == 64
    assert config.output.endswith("-vgg16+mobilenet")


def test_a_fusion_of_imagenet_backbones_learns_real_images(tmp_path):
    data = shared_path("data", "hymenoptera")
    shared_path("weights", "keras", "models", "mobilenet_2_5_224_tf_no_top.h5")
    result = _run(data, tmp_path / "run", "mobilenet:alpha=0.25,mobilenet_v2:alpha=0.35",
                  tmp_path / "cache", weights="imagenet", epochs=5, batch_size=32)
    assert result.summary["features"]["computed"] > 0
    assert result.summary["val_accuracy"] >= 0.85

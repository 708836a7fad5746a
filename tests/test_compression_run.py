"""Pruning in a run: `train --prune`, `fine_tune(prune=)`, `train --prune-filters`."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import last_json, run_cli

import tftransfer
from tftransfer import TrainConfig
from tftransfer.backbones import load_backbone
from tftransfer.errors import RunFolderError
from tftransfer.packing import PACK_LIMIT

VGG = ["--backbone", "vgg16", "--image-size", "32", "--batch-size", "8",
       "--no-report"]
PRUNED = ("block5_conv1", "block5_conv2", "block5_conv3")  # The top 6 layers' convs.


def _sparsity(array) -> float:
    return float(np.mean(np.asarray(array) == 0))


def test_train_prune_reaches_the_sparsity_keeps_it_in_the_files_and_leaves_the_bottom(
        scenes_dir, tmp_path):
    """Each unfrozen kernel ends at 0.8 (±0.01) in the summary, model.keras and
    the SavedModel; the frozen layers are the weights file's, bit for bit."""
    backbone = load_backbone("vgg16", None, 32)
    weights = str(tmp_path / "start.weights.h5")
    network = backbone.get_layer("vgg16")
    network.save_weights(weights)
    run = tmp_path / "run"
    result = run_cli("train", scenes_dir, *VGG, "--weights", weights, "--epochs", "2",
                     "--fine-tune-epochs", "2", "--prune", "0.8", "-o", str(run),
                     "--cache-dir", str(tmp_path / "cache"), "--json")
    assert result.returncode == 0, result.stderr
    pruning = last_json(result.stdout)["pruning"]
    assert {row["layer"] for row in pruning["layers"]} == set(PRUNED)
    assert all(abs(row["sparsity"] - 0.8) <= 0.01 for row in pruning["layers"])
    assert pruning["pruned_kernels_gzip_bytes"] < 0.5 * pruning["dense_kernels_gzip_bytes"]
    assert pruning["saved_model_gzip_bytes"] > 0 and pruning["tflite_gzip_bytes"] > 0

    saved = keras.saving.load_model(str(run / "model.keras"))
    saved_network = saved.get_layer("backbone").get_layer("vgg16")
    for name in PRUNED:
        assert abs(_sparsity(saved_network.get_layer(name).kernel) - 0.8) <= 0.01
        assert saved_network.get_layer(name).kernel.constraint is None
    for layer in network.layers[:-6]:
        if not layer.weights:  # The input layer's name is numbered per process.
            continue
        for before, after in zip(layer.get_weights(),
                                 saved_network.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(before, after)
    served = tf.saved_model.load(str(run / "saved_model"))
    # block4_conv2 and block4_conv3 (frozen, dense), and block5's three: too
    # big to be packed with the small weights, each is a variable of its own.
    assert 3 * 3 * 512 * 512 > PACK_LIMIT
    sparsities = sorted(_sparsity(v.numpy()) for v in served.variables
                        if v.shape == (3, 3, 512, 512))
    assert len(sparsities) == 5 and max(sparsities[:2]) < 0.01
    assert all(abs(s - 0.8) <= 0.01 for s in sparsities[2:])


def test_fine_tune_prune_keeps_the_zeros_through_a_kill_and_resume(scenes_dir,
                                                                  tmp_path):
    data = tftransfer.image_folder_datasets(scenes_dir, image_size=32, batch_size=8)

    def classifier():
        keras.utils.set_random_seed(0)
        return tftransfer.build_classifier(load_backbone("vgg16", None, 32), 3)

    def kernels(model):
        network = model.get_layer("backbone").get_layer("vgg16")
        return {name: network.get_layer(name).kernel.numpy().copy() for name in PRUNED}

    zeros = {}

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:  # The first fine-tuning epoch of four.
                for name, kernel in kernels(self.model_).items():
                    zeros[name] = kernel == 0
                raise KeyboardInterrupt

    def run(callbacks=(), prune=0.8):
        model = classifier()
        for callback in callbacks:
            callback.model_ = model
        tftransfer.fine_tune(model, data.train, data.validation, epochs=1,
                             fine_tune_epochs=4, fine_tune_layers=6, prune=prune,
                             fine_tune_learning_rate=1e-3, output=str(tmp_path / "run"),
                             cache_dir=str(tmp_path / "cache"),
                             callbacks=list(callbacks), verbose=0)
        return model

    with pytest.raises(KeyboardInterrupt):
        run([Stop()])
    assert all(0.1 < mask.mean() < 0.8 for mask in zeros.values())  # Half-way.
    with pytest.raises(RunFolderError, match="prune"):
        run(prune=0.5)  # Another sparsity would not resume the same run.
    epochs = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epochs.append(epoch))
    model = run([record])
    assert epochs == [2, 3, 4]  # Resumed after the killed run's second epoch.
    for name, kernel in kernels(model).items():
        assert np.all(kernel[zeros[name]] == 0), name  # Pruned stays pruned.
        assert abs(_sparsity(kernel) - 0.8) <= 0.01
    with pytest.raises(ValueError, match="prune"):
        tftransfer.fine_tune(classifier(), data.train, data.validation, epochs=1,
                             fine_tune_epochs=1, prune=1.0, verbose=0)


def test_train_prune_filters_narrows_the_top_and_still_learns(scenes_dir, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", scenes_dir, *VGG, "--weights", "none", "--epochs", "6",
                     "--fine-tune-epochs", "2", "--prune-filters", "0.5", "-o",
                     str(run), "--cache-dir", str(tmp_path / "cache"), "--json")
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    narrowed = summary["filter_pruning"]
    assert {row["layer"]: row["filters_after"] for row in narrowed["removed"]} == {
        "block5_conv1": 256, "block5_conv2": 256}
    assert narrowed["params_after"] < narrowed["params_before"]
    assert narrowed["latency_ms_before"] > 0 and narrowed["latency_ms_after"] > 0
    assert summary["val_accuracy"] >= 0.6
    saved = keras.saving.load_model(str(run / "model.keras"))
    network = saved.get_layer("backbone").get_layer("vgg16")
    assert network.get_layer("block5_conv2").filters == 256
    assert network.get_layer("block5_conv3").filters == 512
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3))
    assert np.all(np.isfinite(saved.predict(pixels.astype("float32"), verbose=0)))

    refused = run_cli("train", scenes_dir, "--backbone", "resnet50", "--weights",
                      "none", "--image-size", "32", "--fine-tune-epochs", "1",
                      "--prune-filters", "0.5", "-o", str(tmp_path / "resnet"))
    assert refused.returncode == 2
    assert "`conv4_block5_add` (Add) joins 2 branches" in refused.stderr
    assert "--prune" in refused.stderr
    assert not os.path.exists(tmp_path / "resnet" / "metrics.json")
    for bad in ({"prune": 1.0, "fine_tune_epochs": 1}, {"prune": 0.5},
                {"prune_filters": 0.5}, {"prune_filters": -1, "fine_tune_epochs": 1}):
        with pytest.raises(ValueError, match="prune"):
            TrainConfig(scenes_dir, weights=None, **bad)


def test_report_shows_the_cut_and_the_sparsity_of_each_layer(tmp_path):
    from tftransfer.report import write_report

    summary = {
        "backbone": "mobilenet", "val_accuracy": 0.9,
        "cut": {"layer": "conv_pw_10_relu", "best": "conv_pw_13_relu",
                "tolerance": 0.01, "probe": {"layers": 68, "val_accuracy": 0.85}},
        "pruning": {"sparsity_asked": 0.8, "total": {"weights": 10, "sparsity": 0.8},
                    "layers": [{"layer": "conv_pw_12", "weights": 10,
                                "sparsity": 0.8}],
                    "pruned_kernels_gzip_bytes": 3, "dense_kernels_gzip_bytes": 9,
                    "saved_model_gzip_bytes": 100, "tflite_gzip_bytes": 90},
        "filter_pruning": {"fraction": 0.5, "params_before": 9, "params_after": 5,
                           "removed": [{"layer": "conv_pw_10", "filters_before": 8,
                                        "filters_after": 4}]}}
    page = open(write_report(str(tmp_path), None, summary=summary)).read()
    for text in ("conv_pw_10_relu", "Magnitude pruning", "<td>conv_pw_12</td>",
                 "Filter pruning", "<td>conv_pw_10</td>"):
        assert text in page, text

"""The learning-rate finder, `--learning-rate auto` and discriminative rates."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import last_json, shared_path

import tftransfer
from tftransfer.cli import main
from tftransfer.errors import RunFolderError
from tftransfer.lr_find import lr_find
from tftransfer.settings import TrainConfig


def _separable(n=512, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 16)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(n, seed=0).batch(32)


def test_range_test_restores_everything_and_suggests_inside_its_ramp():
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16),
                              keras.layers.BatchNormalization(),
                              keras.layers.Dense(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [w.copy() for w in model.get_weights()]
    result = lr_find(model, _separable())
    after = model.get_weights()
    # Trainable and BatchNormalization statistics alike, bit for bit.
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert int(model.optimizer.iterations) == 0  # Its own optimizer untouched.
    rates = result.learning_rates
    assert rates[0] == pytest.approx(1e-7)
    assert np.all(np.diff(rates) > 0)
    assert rates[0] < result.suggested_learning_rate < rates[-1]
    assert result.suggested_learning_rate in rates
    # Past the suggestion the loss falls further before it blows up.
    assert min(result.losses) < result.losses[0]
    assert result.stopped_early  # Rates up to 10 diverge on this problem.
    assert max(result.losses) > 4 * min(result.losses)


def test_suggested_rate_trains_the_problem():
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(2)])
    rate = lr_find(model, _separable()).suggested_learning_rate
    model.compile(keras.optimizers.Adam(rate),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(_separable(), epochs=3, verbose=0)
    _, accuracy = model.evaluate(_separable(seed=1), verbose=0)
    assert accuracy > 0.9


def test_range_test_refuses_bad_ranges_and_empty_data():
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="min_learning_rate < max_learning_rate"):
        lr_find(model, _separable(), min_learning_rate=1.0, max_learning_rate=0.1)
    with pytest.raises(ValueError, match="empty"):
        lr_find(model, _separable().take(0))


def test_settings_take_auto_and_check_lr_decay(scenes_dir):
    config = TrainConfig(scenes_dir, backbone="vgg16", learning_rate="auto",
                         fine_tune_learning_rate="auto", lr_decay=0.5)
    assert config.resume_settings()["lr_decay"] == 0.5
    for bad in (0, 1.5, "fast"):
        with pytest.raises(ValueError, match="lr_decay"):
            TrainConfig(scenes_dir, backbone="vgg16", lr_decay=bad)
    with pytest.raises(ValueError, match="number > 0 or \"auto\""):
        TrainConfig(scenes_dir, backbone="vgg16", learning_rate="fastest")


def test_cli_refuses_a_rate_that_is_neither(scenes_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", scenes_dir, "--learning-rate", "quick"])
    assert exit_info.value.code == 2
    assert "a number or auto" in capsys.readouterr().err


def test_lr_find_command_for_both_phases(scenes_dir, tmp_path, capsys):
    options = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32",
               "--epochs", "3", "--cache-dir", str(tmp_path / "cache"), "--json"]
    plot = str(tmp_path / "head.png")
    assert main(["lr-find", scenes_dir, *options, "--plot", plot]) == 0
    head = last_json(capsys.readouterr().out)
    assert head["phase"] == "head" and head["plot"] == plot
    assert os.path.getsize(plot) > 1000
    assert min(head["learning_rates"]) <= head["suggested_learning_rate"] <= max(
        head["learning_rates"])
    plot = str(tmp_path / "fine.png")
    assert main(["lr-find", scenes_dir, *options, "--phase", "fine-tune",
                 "--fine-tune-layers", "3", "--plot", plot]) == 0
    out = capsys.readouterr().out
    fine = last_json(out)
    assert fine["phase"] == "fine_tune" and os.path.isfile(plot)
    assert max(fine["learning_rates"]) <= 0.1 + 1e-9
    assert "suggested fine-tune learning rate" in out
    default_output = TrainConfig(scenes_dir, backbone="vgg16").output
    assert not os.path.exists(default_output)  # No run folder written.


@pytest.mark.shared
def test_auto_rate_trains_on_real_images(tmp_path):
    data = shared_path("data", "hymenoptera")
    shared_path("weights", "keras", "models",
                "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
    run = str(tmp_path / "run")
    assert main(["train", data, "--output", run, "--backbone", "mobilenet_v2",
                 "--alpha", "0.35", "--epochs", "4", "--learning-rate", "auto",
                 "--json"]) == 0
    with open(os.path.join(run, "metrics.json")) as handle:
        metrics = json.load(handle)
    found = metrics["learning_rate_finder"]["head"]["suggested_learning_rate"]
    assert metrics["learning_rate"] == found
    assert 1e-7 < found < 10
    assert metrics["history"]["learning_rate"] == pytest.approx([found] * 4,
                                                                rel=1e-6)
    assert metrics["val_accuracy"] >= 0.85
    assert os.path.isfile(os.path.join(run, "lr_find_head.png"))


def _vgg_classifier():
    keras.utils.set_random_seed(0)
    backbone = tftransfer.load_backbone("vgg16", weights=None, image_size=32)
    return tftransfer.build_classifier(backbone, 3)


def test_lr_decay_slows_the_lower_blocks_and_resumes_with_it(scenes_dir, tmp_path):
    data = tftransfer.image_folder_datasets(scenes_dir, image_size=32, batch_size=16)

    def kernels(model):
        network = model.get_layer("backbone").get_layer("vgg16")
        return {name: network.get_layer(name).kernel.numpy().copy()
                for name in ("block5_conv3", "block5_conv2", "block5_conv1")}

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    def run(lr_decay, callbacks=()):
        model = _vgg_classifier()
        start = kernels(model)
        history = tftransfer.fine_tune(
            model, data.train, data.validation, epochs=1, fine_tune_epochs=2,
            fine_tune_layers=4, fine_tune_learning_rate=1e-3, lr_decay=lr_decay,
            output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
            callbacks=list(callbacks), verbose=0)
        end = kernels(model)
        return history, {name: np.abs(end[name] - start[name]).mean() for name in end}

    with pytest.raises(KeyboardInterrupt):
        run(0.01, [Stop()])
    with pytest.raises(RunFolderError, match="lr_decay"):
        run(0.5)  # Another decay would not resume the same run.
    history, moved = run(0.01)
    assert history.history["phase"] == ["head", "fine_tune", "fine_tune"]
    # The top block at 1e-3, the next two at 1e-5 and 1e-7.
    assert moved["block5_conv3"] > 10 * moved["block5_conv2"] > 0
    assert moved["block5_conv2"] > 10 * moved["block5_conv1"]


def _traced_steps(model):
    """How many times Keras traced `model`'s training step over an iterator."""
    cells = [cell.cell_contents for cell in model.train_function.__closure__]
    (function,) = [c for c in cells if hasattr(c, "experimental_get_tracing_count")]
    return function.experimental_get_tracing_count()


def test_range_test_in_fit_restores_the_optimizer_and_shares_the_trace():
    from tftransfer.lr_find import lr_find_in_fit
    from tftransfer.train import warm_adam

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16),
                              keras.layers.Dense(2)])
    optimizer = warm_adam(1e-3, warmup_steps=4, ema=0.9, adjustable=True)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=["accuracy"])
    train = _separable()
    before = [w.copy() for w in model.get_weights()]
    schedule = optimizer._learning_rate
    result = lr_find_in_fit(model, train, schedule, num_steps=30)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert int(optimizer.iterations) == 0 and float(schedule.override) == 0
    assert all(not np.any(v.numpy()) for v in optimizer.variables
               if "momentum" in v.path or "velocity" in v.path)
    assert result.learning_rates[0] == pytest.approx(1e-7)
    assert result.learning_rates[0] < result.suggested_learning_rate
    assert _traced_steps(model) == 1
    schedule.learning_rate.assign(result.suggested_learning_rate)
    model.fit(train, epochs=2, verbose=0)
    assert _traced_steps(model) == 1  # The test's trace, reused.
    assert float(optimizer.learning_rate) == pytest.approx(
        result.suggested_learning_rate, rel=1e-6)


def test_auto_fine_tuning_rate_is_the_rate_trained_with(scenes_dir, tmp_path):
    run = str(tmp_path / "run")
    assert main(["train", scenes_dir, "--output", run, "--backbone", "vgg16",
                 "--weights", "none", "--image-size", "32", "--epochs", "2",
                 "--fine-tune-epochs", "2", "--fine-tune-layers", "3",
                 "--fine-tune-learning-rate", "auto", "--json"]) == 0
    with open(os.path.join(run, "metrics.json")) as handle:
        metrics = json.load(handle)
    found = metrics["learning_rate_finder"]["fine_tune"]["suggested_learning_rate"]
    assert 1e-6 <= found <= 0.1
    rates = metrics["history"]["learning_rate"]
    assert rates[-1] == pytest.approx(found, rel=1e-6)  # After the warm-up.
    assert rates[0] == pytest.approx(metrics["learning_rate"], rel=1e-6)

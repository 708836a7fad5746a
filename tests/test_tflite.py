"""LiteRT files: each quantization in LiteRT's interpreter, labels, refusals, gate."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import counting_model, last_json

from tftransfer import LiteRTModel, export_checked_tflite, export_tflite
from tftransfer.cli import main
from tftransfer.errors import DataError, RunFolderError, SettingError
from tftransfer.tflite import UnsupportedOpsError, read_labels, read_ops
from tftransfer.tflite_check import AccuracyDropError


@pytest.fixture(scope="module")
def classifier():
    """A small convolutional classifier with random weights, 32 px in.

    Not a random-weight MobileNet: its features are ~1e-16, every image gets
    the same probabilities, and any file would "agree" with it.
    """
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Rescaling(1 / 127.5, offset=-1),
        layers.Conv2D(16, 3, strides=2, activation="relu"),
        layers.BatchNormalization(),
        layers.DepthwiseConv2D(3, activation="relu"),
        layers.Conv2D(64, 1, activation="relu"),
        layers.Conv2D(128, 1, activation="relu"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(3, kernel_initializer=keras.initializers.RandomNormal(0, 20)),
    ])
    logits = model(_pixels(16)).numpy()
    assert len(set(logits.argmax(-1))) > 1 and logits.std() > 0.3  # Informative.
    return model


def _pixels(count, seed=1):
    """Images of one random colour each, with noise: whole pixels in 0..255."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0, 255, (count, 1, 1, 3))
    noise = rng.normal(0, 30, (count, 32, 32, 3))
    return np.clip(np.round(colours + noise), 0, 255).astype("float32")


def _builtin_names():
    from ai_edge_litert import schema_py_generated as schema

    return {name for name in vars(schema.BuiltinOperator) if not name.startswith("_")}


@pytest.mark.parametrize("quantize, tolerance", [
    ("none", 1e-3), ("float16", 1e-3), ("dynamic", 0.02)])
def test_float_input_files_answer_like_the_model(classifier, tmp_path, quantize,
                                                 tolerance):
    path = export_tflite(classifier, str(tmp_path / "model.tflite"),
                         quantize=quantize, class_names=["a", "b", "c"])
    lite = LiteRTModel(path)
    pixels = _pixels(16)
    expected = keras.ops.softmax(classifier(pixels)).numpy()
    assert lite.input_dtype == np.float32
    probabilities = lite.predict(pixels, batch_size=5)  # Batches of any size.
    assert probabilities.shape == (16, 3)
    assert np.abs(probabilities - expected).max() <= tolerance
    ops = read_ops(path)
    assert "CONV_2D" in ops and set(ops) <= _builtin_names()


def test_int8_file_takes_uint8_pixels_and_is_smaller(classifier, tmp_path):
    calibration = tf.data.Dataset.from_tensor_slices(_pixels(64, seed=2)).batch(16)
    int8 = export_tflite(classifier, str(tmp_path / "int8.tflite"), quantize="int8",
                         representative_data=calibration)
    float32 = export_tflite(classifier, str(tmp_path / "float.tflite"))
    lite = LiteRTModel(int8)
    assert lite.input_dtype == np.uint8
    ops = read_ops(int8)
    assert {"QUANTIZE", "DEQUANTIZE", "CONV_2D"} <= set(ops) <= _builtin_names()
    assert os.path.getsize(int8) < 0.5 * os.path.getsize(float32)
    pixels = _pixels(32)
    expected = keras.ops.softmax(classifier(pixels)).numpy()
    probabilities = lite.predict(pixels)
    # Calibrated on images like these (real images: test_int8_run_on_real_images).
    assert np.mean(probabilities.argmax(-1) == expected.argmax(-1)) >= 0.9
    assert np.abs(probabilities - expected).max() < 0.05


def test_int8_needs_calibration_images(classifier, tmp_path):
    with pytest.raises(SettingError, match="representative_data"):
        export_tflite(classifier, str(tmp_path / "m.tflite"), quantize="int8")
    with pytest.raises(SettingError, match="quantize"):
        export_tflite(classifier, str(tmp_path / "m.tflite"), quantize="int4")
    assert os.listdir(tmp_path) == []


class _Bessel(keras.layers.Layer):
    def call(self, inputs):
        return tf.math.special.bessel_i0e(inputs)


def test_op_without_builtin_kernel_is_refused_by_name(tmp_path):
    model = keras.Sequential([keras.Input((8, 8, 3)), _Bessel(),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2)])
    path = str(tmp_path / "model.tflite")
    with pytest.raises(UnsupportedOpsError, match="BesselI0e"):
        export_tflite(model, path)
    assert not os.path.exists(path)


def test_labels_travel_inside_and_beside(classifier, tmp_path):
    names = ["é clair", "中文", "a,b"]
    path = export_tflite(classifier, str(tmp_path / "model.tflite"),
                         class_names=names)
    assert read_labels(path) == names
    with open(tmp_path / "labels.txt", encoding="utf-8") as file:
        assert file.read().split("\n")[:-1] == names
    os.remove(tmp_path / "labels.txt")
    assert LiteRTModel(path).class_names == names  # From the file alone.
    assert read_labels(export_tflite(classifier, str(tmp_path / "bare.tflite"))) is None


def test_existing_file_is_kept_unless_overwrite(classifier, tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"previous")
    with pytest.raises(RunFolderError, match="exists already"):
        export_tflite(classifier, str(path))
    assert path.read_bytes() == b"previous"
    export_tflite(classifier, str(path), overwrite=True)
    assert path.read_bytes()[4:8] == b"TFL3"
    assert sorted(os.listdir(tmp_path)) == ["model.tflite"]  # No leftovers.


def test_a_file_that_is_not_litert_is_refused(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"not a flatbuffer at all" * 10)
    with pytest.raises(DataError, match="not a LiteRT"):
        LiteRTModel(str(path))
    with pytest.raises(DataError, match="No LiteRT file"):
        LiteRTModel(str(tmp_path / "missing.tflite"))


def test_checked_export_gate_keeps_previous_file(classifier, tmp_path):
    pixels = _pixels(16)
    # Labels the model gets right; the float16 file must keep them.
    labels = classifier(pixels).numpy().argmax(-1)
    validation = tf.data.Dataset.from_tensor_slices((pixels, labels)).batch(8)
    path = str(tmp_path / "model.tflite")
    report = export_checked_tflite(classifier, path, validation, "float16",
                                   class_names=["a", "b", "c"])
    assert report["accepted"] and report["keras_accuracy"] == 1.0
    assert report["agreement"] == 1.0 and report["accuracy_drop"] == 0.0
    with open(tmp_path / "model.parity.json") as file:
        assert json.load(file) == json.loads(json.dumps(report))
    assert report["latency_ms"]["1_thread"] > 0 and report["size_bytes"] > 0

    before = open(path, "rb").read()
    # Wrong labels for half the images cannot make the file worse than the
    # model; a negative allowance refuses any file: the gate's own path.
    with pytest.raises(AccuracyDropError, match="was not written") as refused:
        export_checked_tflite(classifier, path, validation, "dynamic",
                              max_accuracy_drop=-0.5, overwrite=True)
    assert refused.value.report["accepted"] is False
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["labels.txt", "model.parity.json",
                                            "model.tflite"]


def test_cli_export_tflite_then_evaluate(trained_run, scenes_dir, tmp_path, capsys):
    output = str(tmp_path / "scenes.tflite")
    assert main(["export-tflite", trained_run, output, "--quantize", "float16",
                 "--json"]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["accepted"] and report["agreement"] == 1.0
    assert report["quantize"] == "float16" and report["path"] == output
    assert main(["evaluate", output, scenes_dir, "--json"]) == 0
    lite = last_json(capsys.readouterr().out)
    assert main(["evaluate", trained_run, scenes_dir, "--json"]) == 0
    served = last_json(capsys.readouterr().out)
    assert lite["num_images"] == served["num_images"] == 48
    assert lite["confusion_matrix"] == served["confusion_matrix"]

    before = open(output, "rb").read()
    assert main(["export-tflite", trained_run, output]) == 2
    assert "exists already" in capsys.readouterr().err
    assert open(output, "rb").read() == before
    keras_file = os.path.join(trained_run, "model.keras")
    assert main(["export-tflite", keras_file, str(tmp_path / "b.tflite")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["export-tflite", trained_run, str(tmp_path / "c.tflite"),
                 "--max-accuracy-drop", "2"]) == 2
    assert "--max-accuracy-drop must be in [0, 1]" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "b.tflite")


@pytest.mark.shared
def test_int8_run_on_real_images(hymenoptera_mobilenet_v2_run, capsys):
    """conftest's MobileNetV2 0.35 (ImageNet) run on hymenoptera, with `--tflite
    int8`; test_shared_end_to_end checks the same run's model."""
    data, run, summary = hymenoptera_mobilenet_v2_run
    report = summary["tflite"]
    assert report["accepted"] and report["quantize"] == "int8"
    assert report["input_dtype"] == "uint8" and report["num_images"] == 153
    assert report["keras_accuracy"] == pytest.approx(summary["val_accuracy"])
    assert report["tflite_accuracy"] >= report["keras_accuracy"] - 0.02
    assert report["agreement"] >= 0.9
    assert summary["settings"]["data_dir"] == os.path.abspath(data)
    with open(os.path.join(run, "model.parity.json")) as file:
        assert json.load(file) == report

    path = os.path.join(run, "model.tflite")
    assert main(["evaluate", path, data, "--json"]) == 0
    evaluation = last_json(capsys.readouterr().out)
    assert evaluation["split"] == "validation" and evaluation["num_images"] == 153
    assert evaluation["accuracy"] == pytest.approx(report["tflite_accuracy"],
                                                   abs=1.5 / 153)


@pytest.mark.shared
def test_blank_calibration_fails_the_check_and_keeps_the_file(
        hymenoptera_mobilenet_v2_run):
    from tftransfer.data import make_dataset
    from tftransfer.folders import scan_image_folder
    from tftransfer.run_folder import load_run_model

    data, run, summary = hymenoptera_mobilenet_v2_run
    path = os.path.join(run, "model.tflite")
    before = open(path, "rb").read()
    paths, labels = scan_image_folder(data, 0.2).paths_and_labels("validation")
    validation = make_dataset(paths, labels, 224)
    black = np.zeros([32, 224, 224, 3], "float32")
    with pytest.raises(AccuracyDropError, match="loses") as refused:
        export_checked_tflite(load_run_model(run), path, validation, "int8",
                              representative_data=[black], overwrite=True)
    assert refused.value.report["accuracy_drop"] > 0.02
    assert open(path, "rb").read() == before


def test_the_conversion_traces_the_model_once(tmp_path):
    """The SavedModel handed to the converter holds the one trace made for
    it (a `tf.function` would be traced again inside `tf.saved_model.save`)."""
    from tftransfer.tflite import _save_serving_function

    model = counting_model()
    _save_serving_function(model, str(tmp_path / "sm"), "float32")
    assert model.get_layer("counting").traces == 1

import csv
import json
import os

import keras
import numpy as np
import tensorflow as tf
from conftest import last_json

import tftransfer  # noqa: F401  (registers the custom layers for load_model)
from tftransfer.cli import main
from tftransfer.data import decode_image


def test_train_writes_a_complete_run_folder(trained_run):
    for name in ("saved_model", "model.keras", "labels.txt", "metrics.json",
                 "history.csv", "data_report.json"):
        assert os.path.exists(os.path.join(trained_run, name)), name
    metrics = json.load(open(os.path.join(trained_run, "metrics.json")))
    assert metrics["num_classes"] == 3
    assert metrics["class_names"] == ["desert", "forest", "ocean"]
    assert metrics["val_accuracy"] >= 0.9
    rows = list(csv.DictReader(open(os.path.join(trained_run, "history.csv"))))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 16))
    assert float(rows[-1]["val_accuracy"]) == metrics["val_accuracy"]
    labels = open(os.path.join(trained_run, "labels.txt")).read().split()
    assert labels == metrics["class_names"]


def test_model_keras_loads_and_matches_the_saved_model(trained_run, scenes_dir):
    model = keras.saving.load_model(os.path.join(trained_run, "model.keras"))
    path = os.path.join(scenes_dir, "ocean", "ocean_001.jpg")
    contents = open(path, "rb").read()
    pixels = decode_image(tf.constant(contents), 32)[None]
    expected = tf.nn.softmax(model(pixels)).numpy()
    served = tf.saved_model.load(os.path.join(trained_run, "saved_model"))
    out = served.signatures["serving_default"](image_bytes=tf.constant([contents]))
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-4)


def test_evaluate_agrees_with_training(trained_run, scenes_dir, capsys):
    assert main(["evaluate", trained_run, scenes_dir, "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["num_images"] == 48 and result["split"] == "all"
    assert result["accuracy"] >= 0.9
    assert set(result["per_class"]) == {"desert", "forest", "ocean"}
    assert np.array(result["confusion_matrix"]).sum() == 48


def test_predict_reports_top_k_and_bad_files(trained_run, scenes_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = os.path.join(scenes_dir, "desert", "desert_002.jpg")
    assert main(["predict", trained_run, good, str(bad), "--top-k", "2",
                 "--json"]) == 0
    results = last_json(capsys.readouterr().out)
    assert results[0]["predictions"][0]["class_name"] == "desert"
    assert len(results[0]["predictions"]) == 2
    assert results[1]["error"] == "not an image"


def test_finished_run_is_not_overwritten(trained_run, scenes_dir, capsys):
    before = {n: os.path.getmtime(os.path.join(trained_run, n))
              for n in os.listdir(trained_run)}
    assert main(["train", scenes_dir, "--output", trained_run, "--backbone",
                 "vgg16", "--weights", "none", "--image-size", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    after = {n: os.path.getmtime(os.path.join(trained_run, n))
             for n in os.listdir(trained_run)}
    assert after == before


def test_bad_arguments_exit_cleanly(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing"), "--output",
                 str(tmp_path / "run")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--backbone", "nope"]) == 2
    assert "Expected one of" in capsys.readouterr().err


def _command(*args, env=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_help_version_and_argument_errors_import_no_tensorflow():
    for argv, status in ((["--help"], 0), (["train", "--help"], 0),
                         (["--version"], 0), (["train"], 2),
                         (["train", "data", "--epochs", "x"], 2)):
        done = _command("-X", "importtime", "-m", "tftransfer", *argv)
        assert done.returncode == status, (argv, done.stderr[-2000:])
        imported = [line.rsplit("|", 1)[-1].strip()
                    for line in done.stderr.splitlines() if "import time:" in line]
        assert "tftransfer.cli" in imported
        assert not [m for m in imported if m.split(".")[0] in ("tensorflow", "keras")], argv
    assert _command("-m", "tftransfer", "--version").stdout.startswith("tftransfer 0.")


def test_tensorflow_start_up_logs_are_hidden_unless_asked_for():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = _command("-m", "tftransfer", "backbones", env=env)
    assert done.returncode == 0 and "mobilenet_v2" in done.stdout
    for log in ("absl::InitializeLog", "cudart_stub", "cuda_platform", "cpu_feature_guard"):
        assert log not in done.stderr, done.stderr
    # The user's own level is theirs: then TensorFlow's logs are not filtered.
    from tftransfer.startup import _LOG_LINE

    assert _LOG_LINE.match("I0000 00:00:1796254724.240541    4098 cudart_stub.cc:31] "
                           "Could not find cuda drivers on your machine.")
    assert not _LOG_LINE.match("Traceback (most recent call last):")

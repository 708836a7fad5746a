"""End to end on real images and real ImageNet weights from ../shared."""

import json
import os

import pytest
from conftest import last_json, shared_path

from tftransfer.cli import main

pytestmark = pytest.mark.shared


def test_hymenoptera_mobilenet_v2_imagenet(hymenoptera_mobilenet_v2_run, capsys):
    # The training (MobileNetV2 0.35, 224 px, 5 epochs) is conftest's, shared
    # with test_tflite: its summary is metrics.json, what `--json` prints.
    data, run, summary = hymenoptera_mobilenet_v2_run
    assert summary["weights"] == "imagenet" and summary["image_size"] == 224
    assert summary["backbone"] == "mobilenet_v2" and summary["alpha"] == 0.35
    assert summary["val_accuracy"] >= 0.85
    report = json.load(open(os.path.join(run, "data_report.json")))
    assert report["counts"]["validation"] == {"ants": 70, "bees": 83}

    assert main(["evaluate", run, data, "--json"]) == 0
    evaluation = last_json(capsys.readouterr().out)
    assert evaluation["split"] == "validation" and evaluation["num_images"] == 153
    assert abs(evaluation["accuracy"] - summary["val_accuracy"]) < 1e-6

    bee = os.path.join(data, "val", "bees")
    files = sorted(os.path.join(bee, n) for n in os.listdir(bee))[:10]
    assert main(["predict", run, *files, "--json"]) == 0
    predictions = last_json(capsys.readouterr().out)
    assert len(predictions) == 10
    assert sum(p["predictions"][0]["class_name"] == "bees" for p in predictions) >= 7


def test_hymenoptera_with_odd_files_at_160_px(tmp_path, capsys):
    """Issue 3's acceptance run: broken and odd files mixed into real data.

    At 160 px MobileNetV2 has its own weights file, absent offline: the 224 px
    weights (same shapes) are used, with a warning.
    """
    import shutil

    from odd_files import write_odd_files

    data = tmp_path / "hymenoptera"
    shutil.copytree(shared_path("data", "hymenoptera"), data)
    expected = {}
    for split, name in (("train", "ants"), ("val", "bees")):
        folder = data / split / name
        for file_name, status in write_odd_files(str(folder / "odd")).items():
            expected[os.path.join(split, name, "odd", file_name)] = status
    run = str(tmp_path / "run")
    with pytest.warns(UserWarning, match="using the 224 px weights"):
        status = main(["train", str(data), "--output", run, "--backbone",
                       "mobilenet_v2", "--alpha", "0.35", "--image-size", "160",
                       "--epochs", "5", "--cache-dir", str(tmp_path / "cache"),
                       "--json"])
    assert status == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["weights"] == "imagenet" and summary["val_accuracy"] >= 0.8
    files = {f["path"]: f for f in
             json.load(open(os.path.join(run, "data_report.json")))["files"]}
    for path, status in expected.items():
        if status is None:
            assert path not in files
        else:
            assert files[path]["status"] == status, files[path]
    assert files[os.path.join("train", "ants", "imageNotFound.gif")]["status"] == "used"


def test_hub_module_written_with_plain_tensorflow(tmp_path, capsys):
    """Issue 6's acceptance run: MobileNet 0.75 as a TF-Hub-format SavedModel."""
    import subprocess
    import sys

    data = shared_path("data", "hymenoptera")
    shared_path("weights", "keras", "models", "mobilenet_7_5_224_tf_no_top.h5")
    module = str(tmp_path / "mobilenet_hub")
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples",
                          "write_hub_module.py")
    subprocess.run([sys.executable, script, module, "--alpha", "0.75"], check=True,
                   capture_output=True, timeout=600)
    run = str(tmp_path / "run")
    assert main(["train", data, "--output", run, "--backbone", f"hub:{module}",
                 "--image-size", "224", "--epochs", "5", "--json"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["val_accuracy"] >= 0.88

    bee = os.path.join(data, "val", "bees", sorted(os.listdir(
        os.path.join(data, "val", "bees")))[0])
    serve = (
        "import sys, tensorflow as tf\n"
        "model = tf.saved_model.load(sys.argv[1])\n"
        "out = model.signatures['serving_default'](\n"
        "    image_bytes=tf.constant([open(sys.argv[2], 'rb').read()]))\n"
        "print(out['class_names'].numpy()[0].decode())\n"
        "assert 'tftransfer' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", serve, summary["saved_model"], bee],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] in ("ants", "bees")

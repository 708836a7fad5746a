"""End to end on real images and real ImageNet weights from ../shared."""

import json
import os

import pytest
from conftest import last_json, shared_path

from tftransfer.cli import main

pytestmark = pytest.mark.shared


def test_hymenoptera_mobilenet_v2_imagenet(tmp_path, capsys):
    data = shared_path("data", "hymenoptera")
    shared_path("weights", "keras", "models",
                "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
    run = str(tmp_path / "run")
    assert main(["train", data, "--output", run, "--backbone", "mobilenet_v2",
                 "--alpha", "0.35", "--image-size", "224", "--epochs", "5",
                 "--json"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["weights"] == "imagenet"
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

"""Probing and cutting a backbone: `tftransfer probe`, `train --cut`."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import last_json, run_cli, shared_path

from tftransfer import TrainConfig, train_run
from tftransfer.backbones import load_backbone
from tftransfer.cache import PACKS_FOLDER
from tftransfer.examples import FolderExamples
from tftransfer.graph import backbone_network
from tftransfer.probe import (
    choose_cut,
    cut_points,
    measure_cut_latencies,
    probe_network,
    truncate,
)
from tftransfer.probe_run import probe_folder

FAST = dict(backbone="vgg16", weights=None, image_size=32, batch_size=8,
            verbose=0)


def _pixels(count=4, size=32):
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (count, size, size, 3)).astype("float32")


def test_cut_points_are_block_outputs_at_one_tensor():
    """MobileNet: each depthwise-pointwise block; ResNet50: each residual
    block's output, never its middle; MobileNetV2: no cut before a ReLU."""
    mobilenet = load_backbone("mobilenet", None, 32, alpha=0.25)
    assert cut_points(mobilenet) == [f"conv_pw_{i}_relu" for i in range(1, 14)]
    resnet = cut_points(load_backbone("resnet50", None, 32))
    assert resnet[0] == "pool1_pool" and resnet[-1] == "conv5_block3_out"
    assert all(name.endswith("_out") for name in resnet[1:]) and len(resnet) == 17
    v2 = cut_points(load_backbone("mobilenet_v2", None, 32, alpha=0.35))
    assert v2[-1] == "out_relu" and "Conv_1_bn" not in v2
    assert "block_2_add" in v2 and "block_2_expand_relu" not in v2


def test_probe_outputs_equal_truncated_backbones_and_the_full_one():
    backbone = load_backbone("mobilenet", None, 32, alpha=0.25)
    layers = cut_points(backbone)
    outputs = probe_network(backbone, layers)(_pixels())
    np.testing.assert_allclose(outputs[-1], backbone(_pixels()), atol=1e-5)
    for layer, output in zip(layers, outputs):
        np.testing.assert_allclose(truncate(backbone, layer)(_pixels()), output,
                                   atol=1e-5)


def test_truncate_keeps_only_the_layers_below_the_cut():
    backbone = load_backbone("vgg16", None, 32)
    short = truncate(backbone, "block3_pool")
    names = [layer.name for layer in backbone_network(short).layers]
    assert "block3_pool" in names and "block4_conv1" not in names
    assert short.output_shape == (None, 256)
    assert short.count_params() < backbone.count_params()
    assert truncate(backbone, "block5_pool") is backbone
    with pytest.raises(ValueError, match="block1_conv1, block1_conv2"):
        truncate(backbone, "block3_conv3_typo")


def test_cut_latencies_come_from_one_pass_in_the_order_asked():
    """Deeper cuts cost more; asking in another order answers in that order;
    a layer that is no cut point is refused."""
    backbone = load_backbone("mobilenet", None, 64, alpha=0.25)
    layers = cut_points(backbone)
    latencies = measure_cut_latencies(backbone, layers, repeats=5)
    assert len(latencies) == len(layers) and latencies[0] > 0
    assert all(b >= a for a, b in zip(latencies, latencies[1:]))
    assert latencies[-1] > latencies[0]
    some = measure_cut_latencies(backbone, [layers[-1], layers[0]], repeats=5)
    assert some[0] > some[1] > 0
    with pytest.raises(ValueError, match="conv_dw_3"):
        measure_cut_latencies(backbone, ["conv_dw_3"])


def test_probe_runs_the_backbone_once_and_feeds_train_cut_from_the_cache(
        scenes_dir, tmp_path, monkeypatch):
    """One pass per split serves every cut, and each image's cuts are one
    cache entry; a `train --cut` after it computes no feature; the run's SavedModel and model.keras hold only the layers the
    probe's table counted, and serve raw bytes with TensorFlow alone."""
    calls = []
    original = FolderExamples.outputs

    def counting(self, network, cache, split, **options):
        calls.append((split, len(network.outputs)))
        return original(self, network, cache, split, **options)

    monkeypatch.setattr(FolderExamples, "outputs", counting)
    cache_dir = str(tmp_path / "cache")
    config = TrainConfig(scenes_dir, cache_dir=cache_dir, **FAST)
    record = probe_folder(config)
    layers = [cut["layer"] for cut in record["cuts"]]
    assert layers == cut_points(load_backbone("vgg16", None, 32))
    assert calls == [("train", 1), ("validation", 1)]
    first = record["features"]
    assert first["train"]["hits"] == first["validation"]["hits"] == 0
    assert first["train"]["computed"] + first["validation"]["computed"] == 48

    def entries():  # One file per image and network (packs aside).
        return sum(name.endswith(".bin") for root, _, names in os.walk(cache_dir)
                   for name in names if os.path.basename(root) != PACKS_FOLDER)

    assert entries() == 48
    assert record["cut"] == choose_cut(record["cuts"], 0.01)["layer"]
    again = probe_folder(config)
    assert again["features"]["train"] == {"hits": first["train"]["computed"],
                                          "computed": 0, "rebuilt": 0}
    assert [c["val_accuracy"] for c in again["cuts"]] == [
        c["val_accuracy"] for c in record["cuts"]]

    row = next(cut for cut in record["cuts"] if cut["layer"] == "block3_pool")
    run = tmp_path / "run"
    result = train_run(TrainConfig(scenes_dir, cache_dir=cache_dir, output=str(run),
                                   cut="block3_pool", epochs=10, report=False,
                                   **FAST))
    assert result.summary["cut"]["layer"] == "block3_pool"
    assert result.summary["features"]["computed"] == 0
    assert result.summary["features"]["hits"] == 48
    assert entries() == 2 * 48  # The cut's own entries, copied from the probe's.
    assert result.summary["val_accuracy"] >= 0.8
    saved = keras.saving.load_model(str(run / "model.keras"))
    network = backbone_network(saved.get_layer("backbone"))
    assert len(network.layers) == row["layers"]
    assert saved.get_layer("backbone").count_params() == row["params"]

    path = os.path.join(scenes_dir, sorted(os.listdir(scenes_dir))[0])
    path = os.path.join(path, sorted(os.listdir(path))[0])
    from tftransfer.data import decode_image

    expected = keras.ops.softmax(
        saved.predict(decode_image(open(path, "rb").read(), 32)[None], verbose=0))
    script = textwrap.dedent(f"""
        import json, sys, tensorflow as tf
        serve = tf.saved_model.load({str(run / "saved_model")!r})
        out = serve.signatures["serving_default"](
            image_bytes=tf.constant([open({path!r}, "rb").read()]))
        print(json.dumps({{"probabilities": out["probabilities"].numpy().tolist(),
                          "tftransfer": "tftransfer" in sys.modules}}))
        """)
    served = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=300)
    assert served.returncode == 0, served.stderr
    answer = last_json(served.stdout)
    assert not answer["tftransfer"]
    np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-4)


def test_cut_auto_records_its_choice_and_bad_cuts_are_refused(scenes_dir, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", scenes_dir, "--backbone", "vgg16", "--weights", "none",
                     "--image-size", "32", "--cut", "auto", "--cut-tolerance", "0.05",
                     "--epochs", "2", "--no-report", "-o", str(run),
                     "--cache-dir", str(tmp_path / "cache"), "--json")
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    with open(run / "probe.json") as file:
        probe = json.load(file)
    assert summary["cut"]["layer"] == probe["cut"] == choose_cut(
        probe["cuts"], 0.05)["layer"]
    assert summary["cut"]["tolerance"] == 0.05
    row = next(cut for cut in probe["cuts"] if cut["layer"] == probe["cut"])
    saved = keras.saving.load_model(str(run / "model.keras"))
    assert len(backbone_network(saved.get_layer("backbone")).layers) == row["layers"]

    refused = run_cli("train", scenes_dir, "--backbone", "vgg16", "--weights",
                      "none", "--image-size", "32", "--cut", "block9_pool",
                      "-o", str(tmp_path / "other"))
    assert refused.returncode == 2
    assert "block1_conv1, block1_conv2" in refused.stderr
    assert not os.path.exists(tmp_path / "other" / "metrics.json")
    with pytest.raises(ValueError, match="fusion"):
        TrainConfig(scenes_dir, backbone="vgg16,mobilenet", weights=None, cut="auto")
    with pytest.raises(ValueError, match="cut_tolerance"):
        TrainConfig(scenes_dir, weights=None, cut="auto", cut_tolerance=1.5)


def test_probe_on_real_images_finds_depth_pays(tmp_path):
    """hymenoptera, MobileNet 0.25 (ImageNet): the last block's linear probe
    is far above the first's, and the CLI's table and JSON agree."""
    data = shared_path("data", "hymenoptera")
    shared_path("weights", "keras", "models", "mobilenet_2_5_224_tf_no_top.h5")
    result = run_cli("probe", data, "--backbone", "mobilenet:alpha=0.25", "--json",
                     "--table", "table.csv", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    record = last_json(result.stdout)
    cuts = record["cuts"]
    assert [cut["layer"] for cut in cuts][-1] == "conv_pw_13_relu"
    assert cuts[-1]["val_accuracy"] >= 0.8
    assert cuts[0]["val_accuracy"] < cuts[-1]["val_accuracy"] - 0.1
    assert all(a["params"] < b["params"] and a["madds"] < b["madds"]
               for a, b in zip(cuts, cuts[1:]))
    assert all(cut["latency_ms"] > 0 for cut in cuts)
    assert "conv_pw_13_relu" in result.stdout
    with open(tmp_path / "table.csv") as file:
        rows = file.read().splitlines()
    assert rows[0] == "layer,layers,params,madds,latency_ms,val_accuracy,cv_accuracy"
    assert len(rows) == len(cuts) + 1


def test_a_standardising_head_survives_restore_and_copy():
    """Keras' Normalization reads its statistics into constants when adapted;
    a checkpoint's restore and a strategy's plain copy must refresh them."""
    from tftransfer.checkpoint import restore_weights
    from tftransfer.heads import build_classifier, plain_copy

    backbone = load_backbone("vgg16", None, 32)
    model = build_classifier(backbone, 3, standardize=True)
    features = np.random.default_rng(0).normal(3.0, 2.0, (64, 512)).astype("float32")
    model.get_layer("head").get_layer("standardize").adapt(features)
    expected = model.predict(_pixels(), verbose=0)
    fresh = build_classifier(load_backbone("vgg16", None, 32), 3, standardize=True)
    restore_weights(fresh, {"weights_of": fresh.name,
                            "model": [w.numpy() for w in model.weights]})
    np.testing.assert_allclose(fresh.predict(_pixels(), verbose=0), expected, atol=1e-5)
    copy = plain_copy(model, load_backbone("vgg16", None, 32), 0.2)
    np.testing.assert_allclose(copy.predict(_pixels(), verbose=0), expected, atol=1e-5)

"""Ensembles and soups of runs: `tftransfer ensemble` and `tftransfer soup`."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import last_json

from tftransfer import ServedModel, build_ensemble, ensemble, soup
from tftransfer.cli import main
from tftransfer.ensemble import fit_member_weights
from tftransfer.errors import DataError
from tftransfer.run_folder import load_run_model

FAST = ["--weights", "none", "--image-size", "32", "--batch-size", "8", "--no-report"]


@pytest.fixture(scope="module")
def runs(scenes_dir, tmp_path_factory):
    """Two VGG16 runs from the same start (seed), fine-tuned at other rates,
    and one MobileNet run: finished run folders."""
    folder = tmp_path_factory.mktemp("runs")
    made = {}
    for name, args in (("slow", ["--backbone", "vgg16", "--learning-rate", "0.003"]),
                       ("fast", ["--backbone", "vgg16", "--learning-rate", "0.01"]),
                       ("mobilenet", ["--backbone", "mobilenet", "--alpha", "0.25"])):
        made[name] = str(folder / name)
        assert main(["train", scenes_dir, *FAST, *args, "--epochs", "8",
                     "--fine-tune-epochs", "1", "--fine-tune-layers", "2",
                     "--output", made[name]]) == 0
    return made


def _images(scenes_dir, count=6):
    paths = []
    for root, _, names in sorted(os.walk(scenes_dir)):
        paths += [os.path.join(root, name) for name in sorted(names)][:2]
    return paths[:count]


def test_an_ensemble_serves_the_mean_of_its_members(runs, scenes_dir, tmp_path, capsys):
    out = str(tmp_path / "ensemble")
    assert main(["ensemble", runs["slow"], runs["mobilenet"], "--output", out,
                 "--json"]) == 0
    summary = last_json(capsys.readouterr().out)
    images = []
    for path in _images(scenes_dir):
        with open(path, "rb") as handle:
            images.append(handle.read())
    members = [ServedModel(os.path.join(run, "saved_model")).predict_bytes(images)
               for run in (runs["slow"], runs["mobilenet"])]
    served = ServedModel(os.path.join(out, "saved_model"))
    assert served.class_names == ["desert", "forest", "ocean"]
    np.testing.assert_allclose(served.predict_bytes(images), np.mean(members, axis=0),
                               atol=1e-5)
    # Each member's accuracy and the ensemble's, from their validation predictions.
    for member, run in zip(summary["members"], (runs["slow"], runs["mobilenet"])):
        with open(os.path.join(run, "metrics.json")) as handle:
            assert member["val_accuracy"] == pytest.approx(
                json.load(handle)["val_accuracy"], abs=1e-6)
        assert member["weight"] == 0.5
    assert 0 < summary["val_accuracy"] <= 1
    with open(os.path.join(out, "metrics.json")) as handle:
        assert json.load(handle)["val_accuracy"] == summary["val_accuracy"]


def test_an_ensemble_teaches_a_student(runs, scenes_dir, tmp_path, capsys):
    teacher = str(tmp_path / "ensemble")
    ensemble([runs["slow"], runs["fast"]], teacher)
    assert main(["distill", scenes_dir, "--teacher", teacher, "--student", "vgg16",
                 *FAST, "--epochs", "1", "--output", str(tmp_path / "student"),
                 "--json"]) == 0
    assert last_json(capsys.readouterr().out)["val_accuracy"] > 0


def test_an_ensemble_of_runs_over_other_classes_is_refused(runs, scenes_dir, tmp_path):
    two = tmp_path / "two"
    for name in ("desert", "forest"):
        shutil.copytree(os.path.join(scenes_dir, name), two / name)
    other = str(tmp_path / "other")
    assert main(["train", str(two), "--backbone", "vgg16", *FAST, "--epochs", "1",
                 "--output", other]) == 0
    with pytest.raises(DataError, match=r"missing \['ocean'\], extra \[\]"):
        ensemble([runs["slow"], other], str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused")


def test_fitted_weights_favour_the_member_that_is_right():
    labels = np.arange(200) % 4
    right = np.eye(4)[labels] * 0.9 + 0.025
    noise = np.random.default_rng(0).dirichlet(np.ones(4), 200)
    weights = fit_member_weights([noise, right], labels)
    assert weights.sum() == pytest.approx(1) and (weights >= 0).all()
    assert weights[1] > 0.95


def test_build_ensemble_resizes_for_a_member_of_another_size():
    small = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    large = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    model = build_ensemble([small, large], [0.25, 0.75])
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    expected = (0.25 * keras.ops.softmax(small(tf.image.resize(pixels, [16, 16])))
                + 0.75 * keras.ops.softmax(large(pixels)))
    np.testing.assert_allclose(keras.ops.softmax(model(pixels)), expected, atol=1e-6)


def test_a_uniform_soup_averages_the_weights(runs, tmp_path, capsys):
    out = str(tmp_path / "soup")
    assert main(["soup", runs["slow"], runs["fast"], "--output", out, "--json"]) == 0
    summary = last_json(capsys.readouterr().out)
    members = [load_run_model(run).get_weights() for run in (runs["slow"], runs["fast"])]
    souped = load_run_model(out).get_weights()
    changed = 0
    for a, b, mean in zip(*members, souped):
        np.testing.assert_allclose(mean, (a + b) / 2, rtol=1e-6, atol=1e-7)
        changed += not np.array_equal(a, b)
    assert changed > 0  # The members differ, so the average is new weights.
    assert [m["weight"] for m in summary["members"]] == [0.5, 0.5]
    assert summary["val_accuracy"] is not None


def test_a_greedy_soup_is_at_least_its_best_member(runs, tmp_path):
    """Its network is the mean of the members it chose, each read as saved
    (evaluating candidates must not change a member), and scores at least
    its best member on the validation split."""
    summary = soup([runs["fast"], runs["slow"]], str(tmp_path / "greedy"), greedy=True)
    best = max(member["val_accuracy"] for member in summary["members"])
    assert summary["val_accuracy"] >= best
    chosen = [load_run_model(m["run"]).get_weights() for m in summary["members"]
              if m["weight"] > 0]
    assert chosen
    for mean, *arrays in zip(load_run_model(summary["run_dir"]).get_weights(), *chosen):
        np.testing.assert_allclose(mean, np.mean(arrays, axis=0), rtol=1e-6, atol=1e-7)


def test_a_soup_of_runs_from_other_backbones_is_refused(runs, tmp_path, capsys):
    assert main(["soup", runs["slow"], runs["mobilenet"], "--output",
                 str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert "weights do not correspond" in error
    assert "backbone: 'vgg16' there, 'mobilenet' here" in error
    assert "tftransfer ensemble" in error
    assert not os.path.exists(tmp_path / "refused")

"""The run report, predictions.csv and the TensorBoard logs."""

import html.parser
import json
import os
import shutil
import urllib.parse

import numpy as np
import pytest
from conftest import last_json

from tftransfer.cli import main
from tftransfer.interpretation import Interpretation
from tftransfer.report import write_report


class _Page(html.parser.HTMLParser):
    """Every reference a page makes, and its table cells' text."""

    def __init__(self):
        super().__init__()
        self.references, self.tags, self.cells, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href"):
                self.references.append(value)
        if tag == "td":
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td":
            self.cells.append(self._cell)
            self._cell = None


def _page(path):
    page = _Page()
    with open(path, encoding="utf-8") as handle:
        page.feed(handle.read())
    page.close()
    return page


def _check_self_contained(report_html):
    """Only files beside it (or the images' own files) and nothing from a network."""
    page = _page(report_html)
    folder = os.path.dirname(report_html)
    assert "script" not in page.tags and "link" not in page.tags
    for reference in page.references:
        parsed = urllib.parse.urlparse(reference)
        assert parsed.scheme in ("", "file"), reference
        if parsed.scheme == "file":
            assert os.path.isfile(urllib.parse.unquote(parsed.path)), reference
        else:
            assert os.path.isfile(os.path.join(folder, reference)), reference
    return page


def _metrics(run):
    with open(os.path.join(run, "metrics.json")) as handle:
        return json.load(handle)


def test_report_numbers_are_the_runs(trained_run):
    metrics = _metrics(trained_run)
    report = metrics["report"]
    assert report == os.path.join(trained_run, "report", "report.html")
    page = _check_self_contained(report)
    assert {"learning_curves.png", "confusion_matrix.png", "top_losses.png",
            "class_counts.png"} <= set(page.references)
    # The predictions the run kept give metrics.json's numbers again, and a
    # head-only run's validation accuracy is the last epoch's.
    kept = Interpretation.read(os.path.join(trained_run, "predictions.csv"))
    again = kept.metrics()
    validation = metrics["validation"]
    assert again["confusion_matrix"] == validation["confusion_matrix"]
    assert again["per_class"] == validation["per_class"]
    assert validation["accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    assert validation["num_images"] == metrics["num_validation"]
    # The page shows them: each class's row of scores.
    for name, scores in validation["per_class"].items():
        row = [name, f"{scores['precision']:.3f}", f"{scores['recall']:.3f}",
               f"{scores['f1']:.3f}", str(scores["support"])]
        assert any(page.cells[i:i + 5] == row for i in range(len(page.cells))), name
    assert f"{validation['accuracy']:.4f}" in open(report).read()


def test_top_losses_are_the_highest_loss_validation_files(trained_run):
    from tftransfer.evaluate import ServedModel

    kept = Interpretation.read(os.path.join(trained_run, "predictions.csv"))
    paths = list(kept.paths)
    # Computed again, directly, through the exported model.
    probabilities = ServedModel(trained_run).predict_files(paths)
    losses = -np.log(np.maximum(probabilities[np.arange(len(paths)), kept.labels],
                                1e-12))
    shown = [row[1] for row in _rows(os.path.join(trained_run, "report",
                                                   "report.html"), 6)]
    assert len(shown) == min(16, len(paths))
    threshold = np.sort(losses)[::-1][len(shown) - 1]
    for path in shown:
        assert losses[paths.index(path)] >= threshold - 1e-4, path


def _rows(report_html, width):
    """The top-losses table: rank, file, true, predicted, probability, loss."""
    cells = _page(report_html).cells
    starts = [i for i in range(len(cells) - width + 1)
              if cells[i] == "1" and os.path.isabs(cells[i + 1])]
    start = starts[0]
    rows = []
    while start + width <= len(cells) and cells[start] == str(len(rows) + 1):
        rows.append(cells[start:start + width])
        start += width
    return rows


def test_report_command_rebuilds_from_the_run_folder_alone(trained_run, tmp_path,
                                                           capsys):
    copy = str(tmp_path / "copy")
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("report"))
    assert main(["report", copy, "--json"]) == 0
    rebuilt = last_json(capsys.readouterr().out)["report"]
    assert rebuilt == os.path.join(copy, "report", "report.html")
    original = _page(os.path.join(trained_run, "report", "report.html")).cells
    assert _check_self_contained(rebuilt).cells == original


def test_evaluate_writes_a_report_with_its_numbers(trained_run, scenes_dir, tmp_path,
                                                   capsys):
    folder = str(tmp_path / "evaluation")
    assert main(["evaluate", trained_run, scenes_dir, "--report", folder,
                 "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    page = _check_self_contained(result["report"])
    assert "learning_curves.png" not in page.references
    assert f"{result['accuracy']:.4f}" in open(result["report"]).read()
    assert sum(map(sum, result["confusion_matrix"])) == result["num_images"] == 48


def test_a_plot_that_fails_warns_and_the_report_is_still_written(tmp_path,
                                                                 monkeypatch):
    import tftransfer.report

    def broken(*args):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(tftransfer.report, "confusion_matrices", broken)
    interpretation = Interpretation([[0.9, 0.1], [0.3, 0.7]], [0, 0], ["a", "b"])
    with pytest.warns(UserWarning, match="confusion_matrix.png.*no fonts"):
        path = tftransfer.report.write_report(str(tmp_path), interpretation)
    text = open(path).read()
    assert "confusion_matrix.png could not be drawn" in text
    assert not os.path.exists(tmp_path / "confusion_matrix.png")
    assert "0.5000" in text  # The accuracy is still there.


def _scalars(folder, tag=None):
    """TensorBoard's own reader on `folder`, and `(step, value)` of `tag`."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    accumulator = EventAccumulator(folder, size_guidance={"tensors": 0})
    accumulator.Reload()
    if tag is None:
        return accumulator, []
    return accumulator, [(event.step, float(tf.make_ndarray(event.tensor_proto)))
                         for event in accumulator.Tensors(tag)]


def test_tensorboard_logs_of_a_run(trained_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    metrics = _metrics(trained_run)
    logs = os.path.join(trained_run, "logs")
    epochs = len(metrics["history"]["loss"])
    _, losses = _scalars(os.path.join(logs, "train"), "epoch_loss")
    assert [step for step, _ in losses] == list(range(epochs))
    assert [v for _, v in losses] == pytest.approx(metrics["history"]["loss"])
    _, rates = _scalars(os.path.join(logs, "train"), "epoch_learning_rate")
    assert [v for _, v in rates] == pytest.approx([0.01] * epochs)
    _, accuracy = _scalars(os.path.join(logs, "validation"), "epoch_accuracy")
    assert [v for _, v in accuracy] == pytest.approx(
        metrics["history"]["val_accuracy"])
    root, _ = _scalars(logs)
    assert "confusion_matrix" in root.Tags()["tensors"]
    content = root.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        content).session_start_info.hparams
    assert hparams["backbone"].string_value == "vgg16"
    assert hparams["epochs"].number_value == epochs


def test_resumed_run_logs_each_epoch_once_on_one_axis(scenes_dir, tmp_path):
    """Both phases on one step axis, and a kill leaves no repeated epoch."""
    import keras

    import tftransfer

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:  # The first fine-tuning epoch has been checkpointed.
                raise KeyboardInterrupt

    def run(callbacks):
        keras.utils.set_random_seed(0)  # The same random backbone, to resume.
        data = tftransfer.image_folder_datasets(scenes_dir, image_size=32,
                                                batch_size=16)
        backbone = tftransfer.load_backbone("vgg16", weights=None, image_size=32)
        model = tftransfer.build_classifier(backbone, 3)
        return tftransfer.fine_tune(model, data.train, data.validation, epochs=2,
                                    fine_tune_epochs=2, fine_tune_layers=3,
                                    output=str(tmp_path / "run"), verbose=0,
                                    callbacks=callbacks, cache_dir=str(tmp_path))

    with pytest.raises(KeyboardInterrupt):
        run([Stop()])
    history = run([])
    assert history.history["phase"] == ["head", "head", "fine_tune", "fine_tune"]
    logs = str(tmp_path / "run" / "logs")
    _, losses = _scalars(os.path.join(logs, "train"), "epoch_loss")
    assert [step for step, _ in losses] == [0, 1, 2, 3]
    assert [v for _, v in losses] == pytest.approx(history.history["loss"])
    _, rates = _scalars(os.path.join(logs, "train"), "epoch_learning_rate")
    assert [v for _, v in rates] == pytest.approx([1e-2, 1e-2, 1e-4, 1e-4])


def test_readme_report_example_runs(scenes_dir, tmp_path, monkeypatch):
    from test_readme import _readme_python

    import tftransfer

    data = tftransfer.image_folder_datasets(scenes_dir, image_size=32, batch_size=16)
    backbone = tftransfer.load_backbone("vgg16", weights=None, image_size=32)
    model = tftransfer.build_classifier(backbone, 3)
    history = tftransfer.fine_tune(model, data.train, data.validation, epochs=2,
                                   verbose=0)
    monkeypatch.chdir(tmp_path)
    namespace = {"tftransfer": tftransfer, "model": model, "data": data,
                 "history": history}
    exec(_readme_python("Seeing what the model learned"), namespace)
    interpretation = namespace["interpretation"]
    assert interpretation.metrics()["num_images"] == len(interpretation.labels) > 0
    assert len(interpretation.top_losses(9)) == min(9, len(interpretation.labels))
    _check_self_contained(str(tmp_path / "report" / "report.html"))


@pytest.mark.shared
def test_report_of_a_real_run(hymenoptera_mobilenet_v2_run):
    _, run, metrics = hymenoptera_mobilenet_v2_run
    page = _check_self_contained(metrics["report"])
    assert "top_losses.png" in page.references
    assert metrics["validation"]["accuracy"] == pytest.approx(
        metrics["val_accuracy"], abs=1e-6)
    assert metrics["validation"]["num_images"] == 153
    text = open(metrics["report"], encoding="utf-8").read()
    # The data section counts each class of each split.
    with open(os.path.join(run, "data_report.json")) as handle:
        counts = json.load(handle)["counts"]
    row = ["bees", str(counts["train"]["bees"]), str(counts["validation"]["bees"])]
    cells = page.cells
    assert any(cells[i:i + 3] == row for i in range(len(cells)))
    assert "LiteRT file" in text and "tflite_accuracy" in text


def test_a_run_whose_plot_fails_still_finishes(scenes_dir, tmp_path, monkeypatch):
    import tftransfer.report
    from tftransfer.run import train_run
    from tftransfer.settings import TrainConfig

    def broken(*args):
        raise MemoryError("drawing")

    monkeypatch.setattr(tftransfer.report, "learning_curves", broken)
    with pytest.warns(UserWarning, match="learning_curves.png"):
        result = train_run(TrainConfig(
            scenes_dir, output=str(tmp_path / "run"), backbone="vgg16",
            weights=None, image_size=32, epochs=2, verbose=0))
    assert os.path.isfile(os.path.join(result.path, "metrics.json"))
    assert result.summary["report"] and os.path.isfile(result.summary["report"])
    assert not os.path.exists(os.path.join(result.path, "report",
                                           "learning_curves.png"))
    assert os.path.isfile(os.path.join(result.path, "report", "confusion_matrix.png"))


def test_odd_class_names_round_trip_through_predictions_and_report(tmp_path):
    names = ["a,b", "café", "$5_$10", 'quote "x"', "猫"]
    probabilities = np.eye(5)[[1, 0, 2, 3, 4, 4]] * 0.9 + 0.02
    interpretation = Interpretation(probabilities, [0, 1, 2, 3, 4, 3], names,
                                    paths=[f"/data/{n}.jpg" for n in "abcdef"])
    path = str(tmp_path / "predictions.csv")
    interpretation.write(path)
    again = Interpretation.read(path)
    assert again.class_names == names
    assert again.metrics() == interpretation.metrics()
    report = write_report(str(tmp_path / "report"), again)
    cells = _check_self_contained(report).cells
    assert set(names) <= set(cells)
    assert os.path.isfile(tmp_path / "report" / "confusion_matrix.png")


def test_report_of_a_run_without_predictions_says_so(trained_run, tmp_path):
    from tftransfer.errors import DataError
    from tftransfer.report import write_run_report

    copy = str(tmp_path / "old")
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns(
        "report", "predictions.csv"))
    text = open(write_run_report(copy), encoding="utf-8").read()
    assert "kept no predictions.csv" in text and "learning_curves.png" in text
    with open(os.path.join(copy, "predictions.csv"), "w") as handle:
        handle.write("not,a,predictions,file\n")
    with pytest.raises(DataError, match="predictions.csv cannot be read"):
        write_run_report(copy)


def test_overwrite_into_a_folder_of_other_files_keeps_its_logs_and_report(
        scenes_dir, tmp_path):
    from tftransfer.run import train_run
    from tftransfer.settings import TrainConfig

    folder = tmp_path / "project"
    for name in ("logs/mine.txt", "report/notes.txt", "README"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("the user's")
    train_run(TrainConfig(scenes_dir, output=str(folder), backbone="vgg16",
                          weights=None, image_size=32, epochs=1, overwrite=True,
                          verbose=0))
    for name in ("logs/mine.txt", "report/notes.txt", "README"):
        assert (folder / name).read_text() == "the user's"
    assert (folder / "report" / "report.html").is_file()

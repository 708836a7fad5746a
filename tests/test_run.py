"""Training runs: odd input, resuming after SIGKILL, killed exports, caching."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import last_json
from odd_files import write_odd_files

from tftransfer import (
    Interpretation,
    ServedModel,
    TrainConfig,
    load_backbone,
    train_run,
)
from tftransfer.checkpoint import RunCheckpoint
from tftransfer.cli import main
from tftransfer.files import recover_interrupted

TINY = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32",
        "--learning-rate", "0.01"]
# Fine-tuning VGG16's top convolution alone (with block5_pool and the global
# pooling: its top three layers): the default top three convolutions take
# 2.36 M weights each through a training step, which at 32 px on a CPU is
# most of a killed-and-resumed run's time and tests nothing more. Tests that
# check the accuracy the fine-tuning reaches keep the default.
TOP = ["--fine-tune-layers", "3"]


def _epochs(run_dir):
    with open(os.path.join(run_dir, "history.csv"), newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def _start(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "tftransfer", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def _assert_default_modes(folder):
    """Every finished file in `folder` has the mode a plain `open` gives."""
    mask = os.umask(0o022)
    os.umask(mask)
    files = [os.path.join(root, name) for root, _, names in os.walk(folder)
             for name in names if not name.startswith(".tmp-")]
    assert files
    for path in files:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~mask), path


def _kill_when(process, condition, timeout=300, signum=signal.SIGKILL):
    """Sends `signum` once `condition()` holds; returns the process's output."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.05)
    process.send_signal(signum)
    return process.communicate(timeout=120)[0]


def _kill_in_fine_tuning(args, run):
    """Starts `tftransfer ARGS` (3 + 4 epochs), kills it once it is fine-tuning;
    returns the epochs in its history."""
    process = _start(*args)
    history = os.path.join(run, "history.csv")
    _kill_when(process, lambda: os.path.exists(history)
               and "fine_tune" in open(history).read())
    assert not os.path.exists(os.path.join(run, "metrics.json"))
    done = _epochs(run)
    assert 4 <= done[-1] < 7
    assert os.path.exists(os.path.join(run, "checkpoint.npz"))
    return done


def test_odd_files_are_reported_each_and_training_completes(scenes_dir, tmp_path,
                                                            capsys):
    data = tmp_path / "data"
    shutil.copytree(scenes_dir, data)
    expected = write_odd_files(str(data / "desert"))
    for name in ("extra1.jpg", "extra2.jpg"):  # Unbalance the classes past 5:1.
        shutil.copy(data / "ocean" / "ocean_000.jpg", data / "ocean" / name)
    for name in sorted(os.listdir(data / "forest"))[3:]:
        os.remove(data / "forest" / name)
    run = str(tmp_path / "run")
    assert main(["train", str(data), "--output", run, *TINY, "--epochs", "2",
                 "--class-weight", "auto", "--json"]) == 0
    out = capsys.readouterr().out
    summary = last_json(out)
    assert "imbalanced" in out and summary["class_imbalance"] > 5
    weights = {int(k): v for k, v in summary["class_weight"].items()}
    assert weights[1] > weights[0] > 0  # forest, the rare class, weighs most.

    report = json.load(open(os.path.join(run, "data_report.json")))
    by_path = {f["path"]: f for f in report["files"]}
    for name, status in expected.items():
        path = os.path.join("desert", name)
        if status is None:
            assert path not in by_path, f"{name} is OS junk and must be ignored"
        else:
            assert by_path[path]["status"] == status, (name, by_path[path])
            assert bool(by_path[path]["reason"]) == (status == "skipped"), name
    skipped = sum(1 for status in expected.values() if status == "skipped")
    assert summary["num_skipped"] == skipped == sum(report["skipped"].values())
    assert "bomb.png: too many pixels" in out


def _refused(args, capsys):
    """`tftransfer ARGS` in this process, which must refuse it (status 2):
    `python -m tftransfer` runs this `main`, without a TensorFlow start-up.
    Returns its output, stdout and stderr."""
    capsys.readouterr()
    assert main(args) == 2
    captured = capsys.readouterr()
    return captured.out + captured.err


def _resumed(args, capsys):
    """`tftransfer ARGS` in this process, after the killed one: its stdout."""
    capsys.readouterr()
    assert main(args) == 0
    return capsys.readouterr().out


def test_killed_run_resumes_and_records_each_epoch_once(scenes_dir, tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["train", scenes_dir, "--output", run, *TINY, "--epochs", "3",
            "--fine-tune-epochs", "4", *TOP, "--cache-dir", str(tmp_path / "cache")]
    done = _kill_in_fine_tuning(args, run)
    _assert_default_modes(run)  # the checkpoint, history, report

    checkpoint = open(os.path.join(run, "checkpoint.npz"), "rb").read()
    out = _refused([*args, "--seed", "1"], capsys)
    assert "other settings" in out and "seed" in out and "Traceback" not in out
    assert open(os.path.join(run, "checkpoint.npz"), "rb").read() == checkpoint

    out = _resumed([*args, "--json"], capsys)
    checkpointed = last_json(out)["resumed_from_epoch"]
    assert checkpointed in (done[-1], done[-1] - 1)
    assert f"Resuming from epoch {checkpointed}" in out
    assert _epochs(run) == list(range(1, 8))
    assert not os.path.exists(os.path.join(run, "checkpoint.npz"))
    _assert_default_modes(run)  # metrics.json, the truncated history too
    _assert_default_modes(tmp_path / "cache")

    out = _refused(args, capsys)
    assert "finished run" in out and "Traceback" not in out


def test_killed_export_leaves_the_previous_model_whole(trained_run, scenes_dir,
                                                       tmp_path):
    destination = str(tmp_path / "saved_model")
    shutil.copytree(os.path.join(trained_run, "saved_model"), destination)
    samples = [os.path.join(scenes_dir, c, f"{c}_000.jpg")
               for c in ("desert", "forest", "ocean")]
    before = ServedModel(destination).predict_files(samples)
    # A different model, so that a half-replaced export would show.
    script = (
        "import keras, tftransfer\n"
        "from tftransfer.export import export_saved_model\n"
        f"model = keras.saving.load_model({os.path.join(trained_run, 'model.keras')!r})\n"
        "dense = model.get_layer('head').layers[-1]\n"
        "dense.kernel.assign(dense.kernel * 0)\n"
        f"export_saved_model(model, {destination!r}, ['desert', 'forest', 'ocean'],"
        " overwrite=True)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)

    def partial_written():
        return any(name.startswith(".saved_model.partial-")
                   and os.listdir(os.path.join(tmp_path, name))
                   for name in os.listdir(tmp_path))

    _kill_when(process, partial_written)
    after = ServedModel(destination).predict_files(samples)
    np.testing.assert_allclose(after, before, atol=1e-6)
    recover_interrupted(destination)
    assert sorted(os.listdir(tmp_path)) == ["saved_model"]


def _count_backbone_passes(monkeypatch) -> list:
    """Records `(network name, images)` of every forward pass over images."""
    from tftransfer import cache

    passes, forward = [], cache._forward_batches

    def counted(network, paths, *args, **kwargs):
        passes.append((network.name, len(paths)))
        return forward(network, paths, *args, **kwargs)

    monkeypatch.setattr(cache, "_forward_batches", counted)
    return passes


def test_fine_tuning_from_cached_activations_matches_the_export(scenes_dir, tmp_path,
                                                                 monkeypatch):
    config = TrainConfig(scenes_dir, output=str(tmp_path / "run"), backbone="vgg16",
                         weights=None, image_size=32, epochs=10, fine_tune_epochs=3,
                         fine_tune_layers=3, learning_rate=0.01,
                         cache_dir=str(tmp_path / "cache"), verbose=0)
    passes = _count_backbone_passes(monkeypatch)
    summary = train_run(config).summary
    images = summary["num_train"] + summary["num_validation"]
    # One pass yields both the head's features and the activations at the cut.
    assert passes == [("backbone_pair", summary["num_train"]),
                      ("backbone_pair", summary["num_validation"])]
    activations = summary["fine_tune_activations"]
    assert activations["computed"] == images == summary["features"]["computed"]
    keras.utils.set_random_seed(config.seed)  # train_run's backbone, before training
    initial = load_backbone("vgg16", None, 32).layers[-1]
    trained = keras.saving.load_model(summary["model"]).get_layer("backbone").layers[-1]
    changed = [not all(np.array_equal(a, b) for a, b in
                       zip(x.get_weights(), y.get_weights()))
               for x, y in zip(initial.layers, trained.layers)]
    assert not any(changed[:-3]) and any(changed[-3:])

    report = json.load(open(os.path.join(summary["run_dir"], "data_report.json")))
    validation = [f for f in report["files"] if f["split"] == "validation"
                  and f["status"] == "used"]
    served = ServedModel(summary["saved_model"])
    probabilities = served.predict_files(
        [os.path.join(scenes_dir, f["path"]) for f in validation])
    labels = [served.class_names.index(f["class"]) for f in validation]
    accuracy = float(np.mean(probabilities.argmax(-1) == labels))
    assert abs(accuracy - summary["val_accuracy"]) < 1e-6

    passes.clear()
    second = train_run(TrainConfig(**{**config.__dict__, "overwrite": True})).summary
    assert passes == []  # Warm: the backbone never runs.
    assert second["features"]["hits"] == images
    assert second["features"]["computed"] == 0
    assert second["fine_tune_activations"]["computed"] == 0
    # The predictions, made from the float32 validation activations, are the
    # served model's.
    written = Interpretation.read(os.path.join(second["run_dir"], "predictions.csv"))
    assert len(written.paths) == len(validation)
    np.testing.assert_allclose(
        written.probabilities,
        ServedModel(second["saved_model"]).predict_files(written.paths), atol=1e-5)


def test_without_a_cache_activations_spill_to_a_folder_removed_after(
        scenes_dir, tmp_path, monkeypatch, capsys):
    passes = _count_backbone_passes(monkeypatch)
    config = TrainConfig(scenes_dir, output=str(tmp_path / "run"), backbone="vgg16",
                         weights=None, image_size=32, epochs=2, fine_tune_epochs=1,
                         fine_tune_layers=3, cache=False)
    summary = train_run(config).summary
    said = capsys.readouterr().out
    assert "the features are kept in memory (" in said
    spill = os.path.join(summary["run_dir"], ".activations")
    assert f"Activations are written to {spill} and removed" in said
    assert not os.path.exists(spill)
    assert summary["fine_tune_activations"]["computed"] == (
        summary["num_train"] + summary["num_validation"])
    assert [name for name, _ in passes] == ["backbone_pair", "backbone_pair"]


def test_files_the_user_had_are_never_replaced(scenes_dir, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "model.keras").write_text("the user's own model")
    args = ["train", scenes_dir, *TINY, "--epochs", "1"]
    assert main([*args, "--output", str(folder)]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert (folder / "model.keras").read_text() == "the user's own model"

    assert main([*args, "--fine-tune-epochs", "1", "--fine-tune-layers", "999",
                 "--output", str(tmp_path / "new")]) == 2
    assert "at most" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_distill_refuses_an_unfinished_train_run(trained_run, scenes_dir, tmp_path,
                                                capsys):
    run = tmp_path / "unfinished"
    run.mkdir()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    RunCheckpoint(str(run), {"backbone": "vgg16"}).save(model, model, 2, "head")
    before = (run / "checkpoint.npz").read_bytes()
    assert main(["distill", scenes_dir, "--teacher", trained_run, "--output",
                 str(run), "--student", "vgg16", "--weights", "none"]) == 2
    error = capsys.readouterr().err
    assert "unfinished run with other settings" in error and "teacher" in error
    assert (run / "checkpoint.npz").read_bytes() == before
    (run / "checkpoint.npz").write_bytes(b"not a checkpoint")
    assert main(["distill", scenes_dir, "--teacher", trained_run, "--output",
                 str(run), "--student", "vgg16", "--weights", "none"]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_killed_distillation_resumes_and_records_each_epoch_once(
        trained_run, scenes_dir, tmp_path, capsys):
    run = str(tmp_path / "student")
    args = ["distill", scenes_dir, "--teacher", trained_run, "--output", run,
            "--student", "vgg16", "--weights", "none", "--learning-rate", "0.01",
            "--epochs", "3", "--fine-tune-epochs", "4", *TOP,
            "--cache-dir", str(tmp_path / "cache")]
    done = _kill_in_fine_tuning(args, run)

    out = _refused([*args, "--temperature", "2"], capsys)
    assert "other settings" in out and "temperature: 3.0 then, 2.0 now" in out

    out = _resumed([*args, "--json"], capsys)
    summary = last_json(out)
    assert summary["resumed_from_epoch"] in (done[-1], done[-1] - 1)
    assert f"Resuming from epoch {summary['resumed_from_epoch']}" in out
    assert _epochs(run) == list(range(1, 8))
    assert len(summary["history"]["val_accuracy"]) == 7
    # The head's epochs were done: its features were not computed again.
    assert summary["features"] is None
    assert not os.path.exists(os.path.join(run, "checkpoint.npz"))
    assert ServedModel(summary["saved_model"]).class_names == summary["class_names"]


@pytest.mark.parametrize("precision", ["off", "float16", "bfloat16"])
def test_mixed_precision_policies_train_with_a_float32_head(scenes_dir, tmp_path,
                                                           precision):
    summary = train_run(TrainConfig(
        scenes_dir, output=str(tmp_path / "run"), backbone="vgg16", weights=None,
        image_size=32, epochs=15, learning_rate=0.01, mixed_precision=precision,
        cache_dir=str(tmp_path / "cache"), verbose=0)).summary
    expected = {"off": "float32", "float16": "mixed_float16",
                "bfloat16": "mixed_bfloat16"}[precision]
    assert summary["dtype_policy"] == expected
    assert keras.config.dtype_policy().name == "float32"  # restored afterwards
    assert summary["val_accuracy"] >= 0.85
    model = keras.saving.load_model(summary["model"])
    conv = model.get_layer("backbone").layers[-1].get_layer("block1_conv1")
    assert conv.compute_dtype == expected.replace("mixed_", "")
    assert conv.variable_dtype == "float32"
    head = model.get_layer("head").get_layer("logits")
    assert head.compute_dtype == "float32"
    pixels = np.zeros((1, 32, 32, 3), "float32")
    assert model(pixels).dtype == "float32"


def test_auto_precision_is_off_on_this_cpu():
    import tensorflow as tf

    from tftransfer.precision import dtype_policy

    if not tf.config.list_physical_devices("GPU"):
        assert dtype_policy("auto") == "float32"


def test_xla_on_trains_every_stage_compiled(scenes_dir, tmp_path):
    """--jit on: features, head and fine-tuning steps under XLA, to the results
    of a run without; random augmentation layers stay in the tf.data map,
    outside the compiled step."""
    summaries = {
        jit: train_run(TrainConfig(
            scenes_dir, output=str(tmp_path / jit), backbone="vgg16", weights=None,
            image_size=32, epochs=15, fine_tune_epochs=1, fine_tune_layers=3,
            learning_rate=0.01, jit=jit, cache_dir=str(tmp_path / "cache"), verbose=0)).summary
        for jit in ("on", "off")
    }
    assert summaries["on"]["xla"] == {"forward": True, "head": True, "fine_tune": True}
    assert not any(summaries["off"]["xla"].values())
    history = summaries["on"]["history"]
    for summary in summaries.values():  # the head phase's last epoch
        assert summary["history"]["val_accuracy"][14] >= 0.85
    # XLA draws other dropout masks, so losses agree closely, not exactly.
    np.testing.assert_allclose(history["loss"], summaries["off"]["history"]["loss"],
                               rtol=0.05)
    augmented = train_run(TrainConfig(
        scenes_dir, output=str(tmp_path / "augmented"), backbone="vgg16",
        weights=None, image_size=32, epochs=2, augment=True, jit="on", verbose=0)).summary
    assert augmented["xla"] == {"head": True}
    assert np.isfinite(augmented["val_loss"])
    with pytest.raises(ValueError, match="`jit` must be one of"):
        TrainConfig(scenes_dir, jit="yes")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_at_once_keeping_every_finished_epoch(scenes_dir, tmp_path,
                                                             capsys, signum):
    run = str(tmp_path / "run")
    args = ["train", scenes_dir, "--output", run, *TINY, "--epochs", "3",
            "--fine-tune-epochs", "4", "--cache-dir", str(tmp_path / "cache")]
    process = _start(*args)
    history = os.path.join(run, "history.csv")
    out = _kill_when(process, lambda: os.path.exists(history)
                     and "fine_tune" in open(history).read(), signum=signum)
    assert process.returncode == 128 + signum, out
    name = signal.Signals(signum).name
    assert f"tftransfer train: stopped by {name}. The run folder keeps" in out
    assert "run the same command to resume" in out and "Traceback" not in out
    leftovers = [name for _, _, names in os.walk(run) for name in names
                 if name.startswith(".tmp-")]
    assert leftovers == [] and os.path.exists(os.path.join(run, "checkpoint.npz"))
    assert not os.path.exists(os.path.join(run, "metrics.json"))
    done = _epochs(run)
    assert done == list(range(1, len(done) + 1)) and done[-1] >= 4

    out = _resumed([*args, "--json"], capsys)
    # The signal may fall between an epoch's history row and its checkpoint.
    checkpointed = last_json(out)["resumed_from_epoch"]
    assert checkpointed in (done[-1], done[-1] - 1)
    assert f"Resuming from epoch {checkpointed}" in out
    assert _epochs(run) == list(range(1, 8))
    assert last_json(out)["val_accuracy"] >= 0.9


def test_a_non_finite_loss_stops_keeping_the_last_finite_epoch(scenes_dir, tmp_path):
    from tftransfer import build_classifier, fine_tune, image_folder_datasets
    from tftransfer.errors import TrainingDiverged

    data = image_folder_datasets(scenes_dir, image_size=32, batch_size=8)
    model = build_classifier(load_backbone("vgg16", weights=None, image_size=32), 3)

    class Poison(keras.callbacks.Callback):
        """Sets the head's kernel to NaN when the third epoch starts."""

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                kernel = model.get_layer("head").layers[-1].kernel
                kernel.assign(np.full(kernel.shape, np.nan, "float32"))

    run = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match="loss became nan in epoch 3"):
        fine_tune(model, data.train, data.validation, epochs=5, output=run,
                  callbacks=[Poison()], verbose=0)
    assert _epochs(run) == [1, 2]  # The NaN epoch was not recorded...
    with np.load(os.path.join(run, "checkpoint.npz")) as archive:
        meta = json.loads(str(archive["meta"]))
        weights = [archive[f"model_{i}"] for i in range(meta["num_model"])]
    assert meta["epoch"] == 2  # ...nor checkpointed over the finite one.
    assert all(np.isfinite(w).all() for w in weights)


def test_a_checkpoint_from_before_added_settings_resumes(tmp_path):
    from tftransfer.errors import RunFolderError

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    old = {"epochs": 5, "learning_rate": 0.01}  # Before lr_decay and the warm-up.
    RunCheckpoint(str(tmp_path), old).save(model, model, 2, "head")
    now = {**old, "lr_decay": 1.0, "fine_tune_warmup": 0.3}
    assert RunCheckpoint(str(tmp_path), now).load()["epoch"] == 2
    # lr_decay had a value before it was a setting (1: one rate); another refuses.
    with pytest.raises(RunFolderError, match="lr_decay"):
        RunCheckpoint(str(tmp_path), {**now, "lr_decay": 0.5}).load()
    with pytest.raises(RunFolderError, match="learning_rate"):
        RunCheckpoint(str(tmp_path), {**now, "learning_rate": 0.1}).load()


def test_fine_tuning_only_weightless_layers_is_said(scenes_dir, tmp_path, capsys):
    """VGG16's top two layers are poolings: unfreezing them trains the head
    alone, which the run says instead of fine-tuning nothing silently."""
    assert main(["train", scenes_dir, "--output", str(tmp_path / "run"), *TINY,
                 "--epochs", "1", "--fine-tune-epochs", "1", "--fine-tune-layers", "2",
                 "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "warning: the top 2 layers of vgg16 hold no weights to train" in out
    assert "--fine-tune-layers" in out

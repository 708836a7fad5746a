"""The Python API on the phase engine: fine_tune's run folder, RunResult, the lock."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from tftransfer import (
    RunFolderError,
    TrainConfig,
    build_classifier,
    fine_tune,
    image_folder_datasets,
    load_backbone,
    train_run,
)
from tftransfer.run_folder import RunFolder

SCRIPT = textwrap.dedent("""
    import json, sys, time
    import keras
    import tftransfer

    data_dir, output, cache_dir, overwrite, slow = sys.argv[1:6]
    keras.utils.set_random_seed(0)
    data = tftransfer.image_folder_datasets(data_dir, image_size=32, batch_size=8)
    backbone = tftransfer.load_backbone("vgg16", weights=None, image_size=32)
    model = tftransfer.build_classifier(backbone, num_classes=3)

    class Slow(keras.callbacks.Callback):  # Time to kill it mid-phase.
        def on_epoch_end(self, epoch, logs=None):
            time.sleep(0.5 if slow == "1" else 0)

    history = tftransfer.fine_tune(
        model, data.train, data.validation, epochs=3, fine_tune_epochs=4,
        fine_tune_layers=3, callbacks=[Slow()], output=output, cache_dir=cache_dir,
        overwrite=overwrite == "1", class_names=data.class_names, verbose=0)
    loss, accuracy = model.evaluate(data.validation, verbose=0)
    print(json.dumps({"phase": history.history["phase"],
                      "val_accuracy": history.history["val_accuracy"],
                      "evaluated": accuracy}))
""")


def _python(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _in_this_process(monkeypatch, capsys, *args):
    """SCRIPT with `args`, run here (no TensorFlow start-up); its JSON line."""
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", ["-c", *args])
        exec(SCRIPT, {"__name__": "__main__"})
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _epochs(run):
    with open(os.path.join(run, "history.csv"), newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def test_fine_tune_with_output_resumes_after_sigkill_and_caches(scenes_dir, tmp_path,
                                                               monkeypatch, capsys):
    run, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    process = _python(scenes_dir, run, cache, "0", "1")  # slow epochs, to kill
    history = os.path.join(run, "history.csv")
    deadline = time.monotonic() + 300
    while not (os.path.exists(history) and "fine_tune" in open(history).read()):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = _epochs(run)
    assert 4 <= done[-1] < 7 and os.path.exists(os.path.join(run, "checkpoint.npz"))
    assert not os.path.exists(os.path.join(run, "metrics.json"))

    # The killed process is gone: the same call resumes in this one.
    result = _in_this_process(monkeypatch, capsys, scenes_dir, run, cache, "0", "0")
    assert _epochs(run) == list(range(1, 8))
    assert result["phase"] == ["head"] * 3 + ["fine_tune"] * 4
    assert np.isfinite(result["evaluated"])  # the model came back compiled
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["resumed_from_epoch"] in (done[-1], done[-1] - 1)
    assert metrics["class_names"] == ["desert", "forest", "ocean"]
    assert not os.path.exists(os.path.join(run, "checkpoint.npz"))

    # overwrite: the same call again
    _in_this_process(monkeypatch, capsys, scenes_dir, run, cache, "1", "0")
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["features"]["computed"] == 0
    assert metrics["features"]["hits"] == 48
    assert metrics["fine_tune_activations"]["computed"] == 0


def test_fine_tune_returns_a_history_and_leaves_the_model_compiled(scenes_dir):
    data = image_folder_datasets(scenes_dir, image_size=32, batch_size=8)
    model = build_classifier(load_backbone("vgg16", weights=None, image_size=32), 3)
    history = fine_tune(model, data.train, data.validation, epochs=15, verbose=0)
    assert isinstance(history, keras.callbacks.History)
    assert history.model is model and history.epoch == list(range(15))
    loss, accuracy = model.evaluate(data.validation, verbose=0)
    assert accuracy == pytest.approx(history.history["val_accuracy"][-1], abs=1e-6)
    assert model.predict(data.validation, verbose=0).shape[-1] == 3

    with pytest.raises(ValueError, match="augment"):
        fine_tune(model, data.train, data.validation, epochs=1, augment=True,
                  cache_features=True)


def test_train_run_returns_a_compiled_model_and_a_history(scenes_dir, tmp_path):
    result = train_run(TrainConfig(scenes_dir, output=str(tmp_path / "run"),
                                   backbone="vgg16", weights=None, image_size=32,
                                   epochs=15, fine_tune_epochs=1, verbose=0))
    assert result.path == str(tmp_path / "run")
    assert result.history.history["phase"] == ["head"] * 15 + ["fine_tune"]
    assert result.summary["history"]["val_accuracy"] == result.history.history[
        "val_accuracy"]
    data = image_folder_datasets(scenes_dir, image_size=32, batch_size=8)
    loss, accuracy = result.model.evaluate(data.validation, verbose=0)
    assert accuracy == pytest.approx(result.summary["val_accuracy"], abs=1e-6)
    saved = json.load(open(os.path.join(result.path, "metrics.json")))
    assert saved["val_accuracy"] == result.summary["val_accuracy"]


def test_a_run_folder_in_use_is_refused_naming_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from tftransfer.run_folder import RunFolder
            RunFolder({str(tmp_path / "run")!r}).lock()
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"pid {holder.pid}"):
            RunFolder(str(tmp_path / "run")).lock()
    finally:
        holder.kill()
        holder.wait()
    # The holder died: its lock is gone with it, and is taken over.
    folder = RunFolder(str(tmp_path / "run"))
    folder.lock()
    assert open(tmp_path / "run" / ".lock").read().strip() == str(os.getpid())
    folder.release()
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_failed_start_leaves_no_folder_behind(tmp_path):
    folder = RunFolder(str(tmp_path / "new"))
    folder.check()
    folder.lock()
    folder.release()  # Nothing was written: the folder it made goes.
    assert not (tmp_path / "new").exists()

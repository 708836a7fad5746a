"""Full, failing and read-only disks: what a run keeps and what the user sees.

Where the machine allows it (root with mount rights) the fault is real: a
small tmpfs that fills up, a read-only bind mount. Elsewhere, and for the
writes a real disk cannot be made to fail at one chosen moment, an `OSError`
(ENOSPC) is raised inside the writer, after part of the file is written.
"""

import csv
import errno
import json
import os
import shutil
import subprocess
import uuid
import warnings

import numpy as np
import pytest
from conftest import last_json

from tftransfer.cli import main

FAST = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32",
        "--batch-size", "8", "--learning-rate", "0.01", "--no-report"]
NO_SPACE = os.strerror(errno.ENOSPC)


def _no_space():
    return OSError(errno.ENOSPC, NO_SPACE)


def _epochs(run_dir):
    with open(os.path.join(run_dir, "history.csv"), newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def _temporaries(folder):
    return [os.path.join(root, name) for root, dirs, names in os.walk(folder)
            for name in names + dirs
            if name.startswith(".tmp-") or ".partial-" in name or ".old-" in name]


def _snapshot(folder):
    """Every file below `folder`, with its bytes."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = handle.read()
    return found


def _mount(*args):
    """Runs `mount ARGS`; `False` where this machine does not allow it."""
    try:
        return subprocess.run(["mount", *args], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_a_full_disk_while_caching_warns_once_and_the_run_goes_on(
        scenes_dir, tmp_path, monkeypatch, capsys):
    """The 31st cache write fails: the features and activations caches are
    dropped with one warning, fine-tuning runs on the images, the run
    finishes; the entries written before the failure serve the next run."""
    from tftransfer.cache import FeatureCache

    real_store, stored = FeatureCache.store, []

    def store(self, digest, value):
        if len(stored) == 30:
            raise _no_space()
        stored.append(self.directory)
        real_store(self, digest, value)

    monkeypatch.setattr(FeatureCache, "store", store)
    cache, run = str(tmp_path / "cache"), str(tmp_path / "run")
    args = ["train", scenes_dir, *FAST, "--epochs", "2", "--fine-tune-epochs", "1",
            "--fine-tune-layers", "2", "--cache-dir", cache, "--output", run, "--json"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        assert main(args) == 0
    summary = last_json(capsys.readouterr().out)
    dropped = {str(w.message) for w in caught if "could not be written" in str(w.message)}
    assert dropped == {f"The feature cache {cache} could not be written ({NO_SPACE}); "
                       "the run goes on without it."}
    assert summary["fine_tune_activations"] is None  # On the images instead.
    assert os.path.exists(os.path.join(run, "metrics.json"))
    monkeypatch.undo()
    assert main([*args, "--overwrite"]) == 0
    again = last_json(capsys.readouterr().out)
    features_written = sum(directory == stored[0] for directory in stored)
    assert again["features"]["hits"] == features_written > 0
    assert again["features"]["rebuilt"] == 0  # Nothing half-written was kept.


def test_a_full_disk_at_a_checkpoint_stops_and_keeps_the_previous_one(
        scenes_dir, tmp_path, monkeypatch, capsys):
    """Epoch 2's checkpoint runs out of space half-way: the command stops
    with one line naming the file and how to resume, epoch 1's checkpoint is
    byte-identical, no temporary file is left, and the same command then
    finishes with each epoch recorded once."""
    import tftransfer.checkpoint as checkpoint_module

    real_write, written = checkpoint_module.write_atomically, []

    def write_atomically(path, write, **options):
        if written:
            def half_then_full(stream):
                stream.write(b"PK\x03\x04 half a checkpoint")
                raise _no_space()
            return real_write(path, half_then_full, **options)
        real_write(path, write, **options)
        with open(path, "rb") as handle:
            written.append(handle.read())

    monkeypatch.setattr(checkpoint_module, "write_atomically", write_atomically)
    run = str(tmp_path / "run")
    args = ["train", scenes_dir, *FAST, "--epochs", "3", "--output", run]
    assert main(args) == 2
    err = capsys.readouterr().err
    checkpoint = os.path.join(run, "checkpoint.npz")
    assert f"could not write {checkpoint}: {NO_SPACE}." in err
    assert "run the same command to resume" in err and "Traceback" not in err
    with open(checkpoint, "rb") as handle:
        assert handle.read() == written[0]  # Epoch 1's, whole.
    assert _temporaries(run) == []
    monkeypatch.undo()
    assert main(args) == 0
    assert "Resuming from epoch 1" in capsys.readouterr().out
    assert _epochs(run) == [1, 2, 3]


def test_a_full_disk_writing_a_history_row_leaves_whole_rows_only(
        scenes_dir, tmp_path, monkeypatch, capsys):
    """Half of epoch 2's row is written when the disk fills: it is cut off,
    `history.csv` is as epoch 1 left it, and the run resumes."""
    import tftransfer.run_folder as run_folder_module

    rows = []

    class Writer(csv.DictWriter):
        def writerow(self, row):
            if row["epoch"] != "epoch":  # Not the header (writeheader).
                rows.append(row)
            if len(rows) == 2 and row["epoch"] == 2:
                self.writer.writerow([2, "head", 0.5])  # Part of the row...
                raise _no_space()  # ...then the disk is full.
            return super().writerow(row)

    monkeypatch.setattr(run_folder_module.csv, "DictWriter", Writer)
    run = str(tmp_path / "run")
    history = os.path.join(run, "history.csv")
    args = ["train", scenes_dir, *FAST, "--epochs", "3", "--output", run]
    assert main(args) == 2
    assert f"could not write {history}: {NO_SPACE}." in capsys.readouterr().err
    assert _epochs(run) == [1]
    with open(history) as handle:
        assert handle.read().endswith("\n")  # Whole rows only.
    monkeypatch.undo()
    assert main(args) == 0
    assert _epochs(run) == [1, 2, 3]


def test_a_full_disk_during_the_export_keeps_the_previous_model(
        scenes_dir, tmp_path, monkeypatch, capsys):
    """A finished run is trained again (--overwrite) and its export runs out
    of space: the previous SavedModel, model.keras and labels are
    byte-identical, no partial folder is left, the run is not marked
    finished, and the same command then finishes it."""
    import tftransfer.export as export_module

    run = str(tmp_path / "run")
    args = ["train", scenes_dir, *FAST, "--epochs", "1", "--output", run, "--overwrite"]
    assert main(args) == 0
    before = {name: files for name, files in
              (("saved_model", _snapshot(os.path.join(run, "saved_model"))),
               ("model.keras", open(os.path.join(run, "model.keras"), "rb").read()))}
    capsys.readouterr()

    def write_labels(path, class_names):
        with open(path, "w") as handle:
            handle.write(class_names[0])
        raise _no_space()

    monkeypatch.setattr(export_module, "write_labels", write_labels)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"could not write {os.path.join(run, 'saved_model')}: {NO_SPACE}." in err
    assert _snapshot(os.path.join(run, "saved_model")) == before["saved_model"]
    assert _temporaries(run) == []
    assert not os.path.exists(os.path.join(run, "metrics.json"))
    monkeypatch.undo()
    assert main(args[:-1]) == 0  # Resumes: every epoch was done, so it exports.
    assert os.path.exists(os.path.join(run, "metrics.json"))


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MB tmpfs, where this machine lets tests mount one."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)):
        pytest.skip("mounting a small tmpfs needs root and mount rights here; "
                    "the injected-ENOSPC tests above cover the same writers")
    yield str(mount_point)
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_real_full_disk_stops_the_run_and_it_resumes_once_freed(
        scenes_dir, small_disk):
    """The run folder is on an 8 MB disk that a callback fills after epoch 1:
    epoch 2's checkpoint fails for real; epoch 1's is whole; once the space
    is freed, the same call resumes, recording each epoch once."""
    import keras

    from tftransfer import (
        build_classifier,
        fine_tune,
        image_folder_datasets,
        load_backbone,
    )

    data = image_folder_datasets(scenes_dir, image_size=32, batch_size=8)
    run = os.path.join(small_disk, "run")
    filler = os.path.join(small_disk, "filler")

    class FillTheDisk(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0 and not os.path.exists(filler):
                with open(filler, "wb", buffering=0) as handle:
                    for size in (65536, 4096, 1):  # To the last byte.
                        try:
                            while True:
                                handle.write(b"\0" * size)
                        except OSError:
                            pass

    def model():  # Small enough for the disk: MobileNet at alpha 0.25.
        keras.utils.set_random_seed(0)
        return build_classifier(load_backbone("mobilenet", alpha=0.25, weights=None,
                                              image_size=32), 3)

    with pytest.raises(OSError) as error:
        fine_tune(model(), data.train, data.validation, epochs=3, output=run,
                  callbacks=[FillTheDisk()], verbose=0)
    assert error.value.errno == errno.ENOSPC
    assert os.path.dirname(error.value.filename) == run
    # Epoch 2's row may fit in the last page history.csv already has; the
    # checkpoint does not: the resume cuts the row and trains epoch 2 again.
    assert _epochs(run) in ([1], [1, 2])
    with np.load(os.path.join(run, "checkpoint.npz")) as archive:
        assert json.loads(str(archive["meta"]))["epoch"] == 1
    assert _temporaries(run) == []
    os.remove(filler)
    history = fine_tune(model(), data.train, data.validation, epochs=3, output=run,
                        verbose=0)
    assert history.epoch == [0, 1, 2] and _epochs(run) == [1, 2, 3]


def test_a_read_only_data_folder_is_never_written(scenes_dir, tmp_path, capsys):
    """A read-only bind mount of the images where the machine allows it, else
    a folder without write permission; either way its files are unchanged and
    nothing is added to it."""
    data = str(tmp_path / "data")
    os.makedirs(data)
    mounted = _mount("--bind", scenes_dir, data)
    if mounted and not _mount("-o", "remount,ro,bind", data):
        subprocess.run(["umount", "-l", data], capture_output=True)
        mounted = False
    if not mounted:
        shutil.copytree(scenes_dir, data, dirs_exist_ok=True)
        for root, _, names in os.walk(data):
            for name in names:
                os.chmod(os.path.join(root, name), 0o444)
            os.chmod(root, 0o555)
    try:
        if mounted:
            probe = os.path.join(data, f"probe-{uuid.uuid4().hex}")
            with pytest.raises(OSError):
                open(probe, "w").close()
        before = _snapshot(data)
        assert main(["train", data, *FAST, "--epochs", "1", "--fine-tune-epochs", "1",
                     "--fine-tune-layers", "2", "--output", str(tmp_path / "run")]) == 0
        assert _snapshot(data) == before
    finally:
        if mounted:
            subprocess.run(["umount", "-l", data], capture_output=True)
        else:
            for root, _, _ in os.walk(data):
                os.chmod(root, 0o755)


def test_a_real_full_disk_during_an_export_keeps_the_previous_one(small_disk):
    """TensorFlow's own writer (the SavedModel's variables) fails for real:
    its error comes out as the `OSError` ENOSPC naming the export, and the
    previous export is byte-identical."""
    import keras

    from tftransfer import export_saved_model

    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(100)])  # 1.2 MB of weights.
    names = [f"class {i}" for i in range(100)]
    path = os.path.join(small_disk, "saved_model")
    export_saved_model(model, path, names)
    before = _snapshot(path)
    free = os.statvfs(small_disk)
    with open(os.path.join(small_disk, "filler"), "wb") as handle:
        handle.write(b"\0" * (free.f_bavail * free.f_frsize - 256 * 1024))
    with pytest.raises(OSError) as error:
        export_saved_model(model, path, names, overwrite=True)
    assert (error.value.errno, error.value.filename) == (errno.ENOSPC, path)
    assert _snapshot(path) == before
    assert _temporaries(small_disk) == []

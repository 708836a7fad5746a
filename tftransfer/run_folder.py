"""The run folder: created, refused or resumed, locked while a run writes it.

Layout (`RUN_DIR`):

    saved_model/      SavedModel for serving (see `export_saved_model`)
    model.keras       the Keras model: pixels 0..255 in, logits out
    labels.txt        class names, one per line, in label order
    history.csv       one row per finished epoch, both phases
    data_report.json  every file considered: used or skipped, and why
    checkpoint.npz    weights and optimizer state after the last finished epoch,
                      while the run is unfinished (see `RunCheckpoint`)
    predictions.csv   the validation images' probabilities (`Interpretation`)
    report/           report.html and its plots (`write_report`)
    logs/             TensorBoard logs (`tftransfer.tensorboard`)
    learning_rates.json, lr_find_*.png
                      the learning-rate finder's results (rates set to auto)
    metrics.json      final metrics and settings; written last, so its presence
                      marks a finished run
    .lock             while a process writes the folder: its pid

Across machines only the chief writes `RUN_DIR`; each other worker keeps its
history in `RUN_DIR/.worker-N` until the run ends.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from typing import Optional

import keras

from tftransfer.checkpoint import RunCheckpoint, truncate_history
from tftransfer.errors import DataError, RunFolderError, TransferError
from tftransfer.export import export_saved_model, write_labels
from tftransfer.files import (
    naming,
    recover_interrupted,
    replace_atomically,
    write_json_atomically,
)
from tftransfer.interpretation import PREDICTIONS_FILE
from tftransfer.keras_files import load_model, save_model
from tftransfer.report import REPORT_FOLDER
from tftransfer.settings import MAX_SERVING_PIXELS
from tftransfer.tensorboard import LOGS_FOLDER, learning_rate_of, restart_logs

try:  # POSIX only; elsewhere runs are not locked against each other.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

RUN_MARKERS = ("data_report.json", "checkpoint.npz", "history.csv", "metrics.json")
WORKER_FOLDER_PREFIX = ".worker-"
LOCK_FILE = ".lock"
FOUND_RATES = "learning_rates.json"  # The learning-rate finder's results.
PROBE_FILE = "probe.json"  # The probe `--cut auto` chose by.
# The gzip size of the kernels `--prune` prunes, dense (see `Engine`).
PRUNING_REFERENCE = "pruning_reference.json"


class HistoryCSV(keras.callbacks.Callback):
    """Appends one row per finished epoch to a CSV file, flushed at once.

    `keras.callbacks.CSVLogger` is not used because it has no column for the
    training phase and fixes its columns from the first model it logs, while the
    two phases here are two `fit` calls.

    Args:
        path: The CSV file; created with a header if missing, appended otherwise.
        phase: Written in the `phase` column (`"head"` or `"fine_tune"`).
    """

    def __init__(self, path: str, phase: str):
        super().__init__()
        self.path = path
        self.phase = phase

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        rate = learning_rate_of(self.model)
        if rate is not None:
            logs.setdefault("learning_rate", rate)
        columns = None
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, newline="") as handle:
                columns = next(csv.reader(handle), None)
        write_header = columns is None
        if write_header:
            columns = ["epoch", "phase", *sorted(logs)]
        row = {"epoch": epoch + 1, "phase": self.phase, **logs}
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        try:
            with open(self.path, "a", newline="") as handle:
                writer = csv.DictWriter(handle, columns, extrasaction="ignore")
                if write_header:
                    writer.writeheader()
                writer.writerow(row)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            # A full disk may have taken part of the row: cut it off, so the
            # file holds whole rows only, the finished epochs'.
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            raise naming(error, self.path) from error


def read_history(path: str) -> dict:
    """`history.csv` as per-epoch lists, like `History.history`, plus `phase`."""
    history = {}
    if os.path.exists(path):
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if key == "phase":
                        history.setdefault(key, []).append(value)
                    elif key != "epoch" and value not in ("", None):
                        history.setdefault(key, []).append(float(value))
    return history


class RunFolder:
    """One run's folder: refuses, locks, resumes, records and finishes it.

    Args:
        path: The run folder (`--output`).
        overwrite: Replace a finished run, or start an unfinished one over.
            Defaults to `False`.
        worker: This process's worker index across machines, or `None` for the
            chief: other workers write `path/.worker-N`. Defaults to `None`.

    Raises:
        RunFolderError: from `check` and `lock`.
    """

    def __init__(self, path: str, overwrite: bool = False,
                 worker: Optional[int] = None):
        self.root = os.path.abspath(os.fspath(path))
        self.overwrite = overwrite
        self.is_chief = worker is None
        self.path = (self.root if worker is None
                     else os.path.join(self.root, f"{WORKER_FOLDER_PREFIX}{worker}"))
        self.checkpoint: Optional[RunCheckpoint] = None
        self._lock = None
        self._created = False

    def __enter__(self) -> RunFolder:
        """Checks and locks the folder (see `check` and `lock`)."""
        self.check()
        self.lock()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    @property
    def history_path(self) -> str:
        return os.path.join(self.path, "history.csv")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def check(self) -> None:
        """Refuses a finished run (unless `overwrite`) or a folder of other files.

        Writes nothing.
        """
        path = self.path
        if os.path.exists(path) and not os.path.isdir(path):
            raise RunFolderError(f"--output {path} exists and is not a folder.")
        if os.path.exists(self.file("metrics.json")) and not self.overwrite:
            raise RunFolderError(
                f"{path} holds a finished run already. Nothing was changed. "
                "Pass --overwrite (overwrite=True) to replace it, or choose another "
                "--output."
            )
        others = [name for name in os.listdir(path)
                  if not name.startswith(".")] if os.path.isdir(path) else []
        if others and not self.overwrite and not any(
                os.path.exists(self.file(name)) for name in RUN_MARKERS):
            raise RunFolderError(
                f"--output {path} holds other files and no tftransfer run. Nothing "
                "was changed. Choose a new or empty folder, or pass --overwrite "
                "(overwrite=True) to write the run's files there anyway."
            )

    def lock(self) -> None:
        """Takes the folder for this process, creating it if needed.

        A lock is released when its process ends, however it ends: a lock a
        killed run left is taken over.

        Raises:
            RunFolderError: another live process holds it (its pid is named).
        """
        self._created = not os.path.exists(self.path)
        os.makedirs(self.path, exist_ok=True)
        if fcntl is None or self._lock is not None:
            return
        path = self.file(LOCK_FILE)
        while True:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(handle, 32).decode(errors="replace").strip()
                os.close(handle)
                raise RunFolderError(
                    f"{self.path} is being written by another tftransfer process "
                    f"(pid {holder or 'unknown'}). Nothing was changed. Wait for it "
                    "to end or stop it, or choose another --output."
                ) from None
            # The holder removes the file as it lets go: a lock taken on a
            # file no longer at `path` locks nothing; take the new one.
            try:
                if os.fstat(handle).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(handle)
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        self._lock = handle

    def release(self) -> None:
        """Releases the lock; removes the folder if this run made it and wrote
        nothing into it (it failed before starting)."""
        if self._lock is not None:
            # Removed while still held, so that no one locks a file on its way out.
            _remove(self.file(LOCK_FILE))
            os.close(self._lock)
            self._lock = None
        if self._created and os.path.isdir(self.path) and set(
                os.listdir(self.path)) <= {LOCK_FILE}:
            shutil.rmtree(self.path, ignore_errors=True)

    def resume_state(self, settings: dict, workers, policy: str) -> Optional[dict]:
        """The checkpoint to resume from, or `None` to start afresh.

        Only the chief's checkpoint counts: across machines every worker
        resumes from it (`Workers.share_state`), and a worker with other
        settings is refused. They must agree on the dtype `policy` too, which
        `auto` may set apart: float16 steps take an extra collective op.

        Raises:
            RunFolderError: the checkpoint was left by other settings, or
                cannot be read, and `overwrite` is False.
        """
        self.checkpoint = RunCheckpoint(self.path, settings)
        state = None if self.overwrite or not self.is_chief else self.checkpoint.load()
        return workers.share_state(state, {**self.checkpoint.settings,
                                           "dtype_policy": policy})

    def prepare(self, state: Optional[dict], report: Optional[dict]) -> None:
        """Readies the folder to train into, from `state` (`None`: afresh).

        Marks the run unfinished (no `metrics.json`), puts back an export a kill
        interrupted, removes partial files, and either starts afresh (no
        checkpoint, no history) or cuts the history back to `state`'s epoch.
        Then writes the data report.
        """
        # report/ and logs/ are emptied only where a run wrote them: with
        # --overwrite into a folder of other files, folders of those names
        # are the user's.
        holds_run = any(os.path.exists(self.file(name)) for name in RUN_MARKERS)
        _remove(self.file("metrics.json"))  # The folder is unfinished now.
        for name in ("model.tflite", "model.parity.json", PREDICTIONS_FILE):
            _remove(self.file(name))  # Made from the model this run replaces.
        if holds_run and os.path.isdir(self.file(REPORT_FOLDER)):
            shutil.rmtree(self.file(REPORT_FOLDER))
        for name in ("saved_model", "model.keras"):
            recover_interrupted(self.file(name))
        self.checkpoint.remove_temporaries()
        if state is None:
            self.checkpoint.clear()
            _remove(self.history_path)
            for name in (FOUND_RATES, PROBE_FILE, PRUNING_REFERENCE,
                         "lr_find_head.png", "lr_find_fine_tune.png"):
                _remove(self.file(name))
        else:
            truncate_history(self.history_path, state["epoch"])
        if self.is_chief and (holds_run or not os.path.exists(
                self.file(LOGS_FOLDER))):  # Finished epochs only, each once.
            restart_logs(self.file(LOGS_FOLDER),
                         None if state is None else self.history())
        if report is not None:
            write_json_atomically(self.file("data_report.json"), report)

    def found_rates(self) -> dict:
        """What the learning-rate finder found for this run, per phase."""
        return self.read_json(FOUND_RATES) or {}

    def save_found_rates(self, found: dict) -> None:
        """Keeps the finder's results, so that a resumed run uses the same rates."""
        self.write_json(FOUND_RATES, found)

    def read_json(self, name: str) -> Optional[dict]:
        """A JSON file of the run folder (`probe.json`), or `None`."""
        path = self.file(name)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    def write_json(self, name: str, value: dict) -> None:
        write_json_atomically(self.file(name), value)

    def history(self) -> dict:
        """The finished epochs' metrics (see `read_history`)."""
        return read_history(self.history_path)

    def write_model(self, model: keras.Model, class_names: list,
                    max_pixels: int = MAX_SERVING_PIXELS) -> str:
        """Writes `model.keras`, `labels.txt` and `saved_model/`; returns the latter.

        Each is written beside its place and renamed into it; the SavedModel
        refuses images declaring more than `max_pixels` pixels.
        """
        replace_atomically(self.file("model.keras"),
                           lambda path: save_model(model, path))
        write_labels(self.file("labels.txt"), class_names)
        return export_saved_model(model, self.file("saved_model"), class_names,
                                  overwrite=True, max_pixels=max_pixels)

    def finish(self, summary: dict) -> None:
        """Writes `metrics.json` (the mark of a finished run), drops the checkpoint."""
        write_json_atomically(self.file("metrics.json"), summary)
        self.checkpoint.clear()

    def remove(self) -> None:
        """Removes a worker's folder at the end of a run (never the chief's)."""
        if not self.is_chief:
            self.release()
            shutil.rmtree(self.path, ignore_errors=True)


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


UNSAFE_HINT = (
    "Its backbone is a TF-Hub module, which runs an external SavedModel's graph, "
    "so Keras' safe mode refuses to load it. If you trust the file, pass "
    "--unsafe-deserialization (safe_mode=False / unsafe_deserialization=True)."
)


def model_file(path: str) -> Optional[str]:
    """The `.keras` file of a run folder or the `.keras` file itself, or `None`."""
    path = os.path.join(path, "model.keras") if os.path.isdir(path) else path
    return path if path.endswith(".keras") and os.path.isfile(path) else None


def load_run_model(path: str, safe_mode: bool = True) -> keras.Model:
    """Loads the Keras model of a run folder, or a `.keras` file.

    Args:
        path: A run folder (holding `model.keras`) or a `.keras` file.
        safe_mode: Keras' safe mode. A model whose backbone is a TF-Hub module
            loads only with `False`, since it runs an external SavedModel's
            graph. Defaults to `True`.

    Returns:
        The model, uncompiled: pixels 0..255 in, logits out.

    Raises:
        DataError: no model at `path`.
        TransferError: the model needs `safe_mode=False`.
    """
    import tftransfer  # noqa: F401  (registers tftransfer's layers for loading)

    file = model_file(path)
    if file is None:
        raise DataError(f"No model at {path}: expected a run folder or a .keras file.")
    try:
        return load_model(file, compile=False, safe_mode=safe_mode)
    except ValueError as error:
        if "safe_mode" not in str(error) and "safe mode" not in str(error):
            raise
        raise TransferError(f"Cannot load {file}. {UNSAFE_HINT}") from error

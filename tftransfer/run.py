"""A training run: from an image folder to a run folder with everything a user needs.

Run folder layout (`RUN_DIR`):

    saved_model/      SavedModel for serving (see `export_saved_model`)
    model.keras       the Keras model: pixels 0..255 in, logits out
    labels.txt        class names, one per line, in label order
    history.csv       one row per finished epoch, both phases
    data_report.json  every file considered: used or skipped, and why
    checkpoint.npz    weights and optimizer state after the last finished epoch,
                      while the run is unfinished (see `RunCheckpoint`)
    metrics.json      final metrics and settings; written last, so its presence
                      marks a finished run

A run killed at any point resumes from its last finished epoch when started again
with the same settings.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tftransfer.backbones import (
    backbone_network,
    get_backbone_spec,
    load_backbone,
    split_backbone,
)
from tftransfer.cache import (
    cached_outputs,
    default_cache_dir,
    feature_cache_key,
    open_cache,
    weights_fingerprint,
)
from tftransfer.checkpoint import (
    RunCheckpoint,
    restore_optimizer,
    restore_weights,
    truncate_history,
)
from tftransfer.data import (
    DECODED_CACHE_BYTES,
    ImageFolder,
    image_folder_datasets,
    scan_image_folder,
)
from tftransfer.distribute import (
    STRATEGIES,
    Workers,
    distributed_fit,
    make_strategy,
)
from tftransfer.errors import RunFolderError, check_choice
from tftransfer.export import export_saved_model, recover_interrupted, write_labels
from tftransfer.files import write_atomically
from tftransfer.heads import build_classifier
from tftransfer.hub import hub_layer
from tftransfer.report import class_imbalance, data_report, summarize_data
from tftransfer.train import (
    FINE_TUNE_LEARNING_RATE,
    HEAD_LEARNING_RATE,
    JIT_SETTINGS,
    HistoryCSV,
    balanced_class_weights,
    compile_classifier,
    default_fine_tune_layers,
    feature_dataset,
    jit_for,
    unfreeze_top,
)

PRECISIONS = ("auto", "off", "float16", "bfloat16")
IMBALANCE_WARNING = 5.0  # Largest to smallest class ratio that earns a warning.


@dataclasses.dataclass
class TrainConfig:
    """Settings of `train_run`; the command line's `train` options.

    Args:
        data_dir: Folder of class folders (or of train/ and val/ split folders).
        output: The run folder. Defaults to `saved_models/<data>-<backbone>`.
        backbone: A registered backbone name. Defaults to `"mobilenet_v2"`.
        alpha: MobileNet width multiplier. Defaults to `None`.
        weights: `"imagenet"`, `None` or a weights file. Defaults to `"imagenet"`.
        image_size: Defaults to the backbone's default size.
        epochs: Epochs with the backbone frozen. Defaults to `5`.
        fine_tune_epochs: Epochs with the top of the backbone unfrozen.
            Defaults to `0`.
        fine_tune_layers: Layers to unfreeze. Defaults to the top 30%.
        batch_size: Defaults to `32`.
        learning_rate: Head-phase learning rate. Defaults to `1e-2`
            (see `fine_tune`).
        fine_tune_learning_rate: Fine-tuning learning rate. Defaults to `1e-4`.
        augment: Random flips, rotations and zooms of training images.
            Defaults to `False`.
        validation_split: Used when the data has no split folders.
            Defaults to `0.2`.
        seed: Split, shuffling and initialization seed. Defaults to `0`.
        dropout: Head dropout rate. Defaults to `0.2`.
        class_weight: `"auto"` weighs each class's loss by the inverse of its
            share of the training images; `None` leaves them equal.
            Defaults to `None`.
        cache_dir: Feature cache folder. Defaults to `default_cache_dir()`.
        cache: Keep backbone features on disk between runs. With `False` they
            are computed once per run, in memory. Defaults to `True`.
        mixed_precision: `"auto"`, `"off"`, `"float16"` or `"bfloat16"`: the
            Keras dtype policy of the backbone while training. `"auto"` picks
            float16 on a GPU of compute capability 7.0 or more (Tensor Cores)
            and off elsewhere: on CPUs float16 is emulated and slower. The head
            and its softmax stay float32. Defaults to `"auto"`.
        jit: `"auto"`, `"on"` or `"off"`: compile the backbone's forward passes
            and the training steps with XLA. `"auto"` decides per network, where
            it was measured to pay (see `jit_for`). Defaults to `"auto"`.
        strategy: `"auto"`, `"default"`, `"mirrored"` or `"multi_worker"`; see
            `make_strategy`. With `"multi_worker"` every machine runs the same
            command with its own `TF_CONFIG`; `batch_size` is the global batch,
            shared out among the workers, and only the chief writes the run
            folder. Defaults to `"auto"`.
        overwrite: Replace a finished run in `output`, or start an unfinished
            one over instead of resuming it. Defaults to `False`.
        verbose: Progress output (`"auto"`, 0, 1, 2). Defaults to `"auto"`.
    """

    data_dir: str
    output: Optional[str] = None
    backbone: str = "mobilenet_v2"
    alpha: Optional[float] = None
    weights: Optional[str] = "imagenet"
    image_size: Optional[int] = None
    epochs: int = 5
    fine_tune_epochs: int = 0
    fine_tune_layers: Optional[int] = None
    batch_size: int = 32
    learning_rate: float = HEAD_LEARNING_RATE
    fine_tune_learning_rate: float = FINE_TUNE_LEARNING_RATE
    augment: bool = False
    validation_split: float = 0.2
    seed: int = 0
    dropout: float = 0.2
    class_weight: Optional[str] = None
    cache_dir: Optional[str] = None
    cache: bool = True
    mixed_precision: str = "auto"
    jit: str = "auto"
    strategy: str = "auto"
    overwrite: bool = False
    verbose: object = "auto"

    def __post_init__(self):
        for name in ("epochs", "fine_tune_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"`{name}` must be >= 0. Received: {name}={getattr(self, name)}"
                )
        if self.epochs + self.fine_tune_epochs == 0:
            raise ValueError("Nothing to train: `epochs` and `fine_tune_epochs` are 0.")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1. Received: {self.batch_size}")
        for name in ("learning_rate", "fine_tune_learning_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"`{name}` must be > 0. Received: {name}={getattr(self, name)}"
                )
        check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        check_choice("jit", self.jit, JIT_SETTINGS)
        check_choice("strategy", self.strategy, STRATEGIES)
        if self.class_weight not in (None, "auto"):
            raise ValueError(
                "`class_weight` must be 'auto' or None. "
                f"Received: class_weight={self.class_weight!r}"
            )
        spec = get_backbone_spec(self.backbone)
        self.backbone = spec.name
        self.image_size = int(self.image_size or spec.default_image_size)
        if self.output is None:
            data_name = os.path.basename(os.path.normpath(self.data_dir)) or "data"
            self.output = os.path.join(
                "saved_models", f"{data_name}-{safe_name(spec.name)}"
            )
        if self.fine_tune_layers is not None and self.fine_tune_layers < 1:
            raise ValueError(
                "`fine_tune_layers` must be >= 1. "
                f"Received: fine_tune_layers={self.fine_tune_layers}"
            )


def augmentation_layers(seed: int = 0) -> keras.Sequential:
    """Random flips, small rotations and zooms, applied in the tf.data pipeline."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.1, seed=seed),
            keras.layers.RandomZoom(0.1, seed=seed),
        ],
        name="augmentation",
    )


def say(config, message):
    if config.verbose != 0:
        print(message, flush=True)


def check_run_folder(output: str, overwrite: bool) -> None:
    """Refuses a run folder that holds a finished run, unless `overwrite`."""
    if os.path.exists(os.path.join(output, "metrics.json")) and not overwrite:
        raise RunFolderError(
            f"{output} holds a finished run already. Nothing was changed. "
            "Pass --overwrite (overwrite=True) to replace it, or choose another "
            "--output."
        )
    if os.path.exists(output) and not os.path.isdir(output):
        raise RunFolderError(f"--output {output} exists and is not a folder.")
    others = [name for name in os.listdir(output)
              if not name.startswith(WORKER_FOLDER_PREFIX)] if os.path.isdir(output) else []
    if others and not overwrite and not any(
        os.path.exists(os.path.join(output, name)) for name in RUN_MARKERS
    ):
        raise RunFolderError(
            f"--output {output} holds other files and no tftransfer run. Nothing "
            "was changed. Choose a new or empty folder, or pass --overwrite "
            "(overwrite=True) to write the run's files there anyway."
        )


RUN_MARKERS = ("data_report.json", "checkpoint.npz", "history.csv", "metrics.json")
# Workers other than the chief keep their history and data report in
# RUN_DIR/.worker-N, and delete it when the run ends (see `_train_run`).
WORKER_FOLDER_PREFIX = ".worker-"


def safe_name(name: str) -> str:
    """A folder-name-safe form of a backbone name (`hub:` handles are URLs)."""
    if name.startswith("hub:"):
        name = "hub-" + os.path.basename(os.path.normpath(name[4:].rstrip("/")))
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def write_json_atomically(path: str, payload) -> None:
    """Writes JSON to a temporary file beside `path`, then renames it into place."""
    write_atomically(path, lambda stream: stream.write(
        json.dumps(payload, indent=2) + "\n"), text=True)


def run_settings(config, folder: ImageFolder) -> dict:
    """What must not change for a killed run to be resumed: settings and data.

    Also what every worker of a cluster must agree on. `config` is a
    `TrainConfig` or a `DistillConfig`.
    """
    settings = dataclasses.asdict(config)
    # `cache` stays: it decides whether fine-tuning trains from activations,
    # and so which optimizer state the checkpoint holds.
    # `strategy` and `jit` go: a run may resume on another machine or cluster,
    # with or without XLA.
    for name in ("output", "overwrite", "verbose", "cache_dir", "strategy", "jit"):
        settings.pop(name)
    settings["data_dir"] = os.path.abspath(config.data_dir)
    data = hashlib.sha256()
    for f in sorted(folder.files, key=lambda f: (f.split, f.path)):
        if f.status == "used":
            data.update(f"{f.split}:{f.label}:{f.digest}\n".encode())
    settings["data"] = data.hexdigest()
    return settings


def read_history(path: str) -> dict:
    """`history.csv` as a dict of per-epoch metric lists, like `History.history`."""
    history = {}
    if os.path.exists(path):
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if key not in ("epoch", "phase") and value not in ("", None):
                        history.setdefault(key, []).append(float(value))
    return history


@dataclasses.dataclass
class Resumable:
    """What the training phases of a `train` or `distill` run share.

    Built by the run after `resume_state` and `prepare_run_folder`; `fit`
    trains one phase from the resume point.
    """

    config: object  # A `TrainConfig` or a `DistillConfig`.
    workers: Workers
    checkpoint: RunCheckpoint
    state: Optional[dict]  # From `resume_state`.
    history_path: str
    totals: dict  # Examples per split over all workers, for `Workers.lockstep`.

    @property
    def start(self) -> int:
        """The last finished epoch: 0 for a new run."""
        return self.state["epoch"] if self.state else 0

    def fit(self, training_model, train, validation, epochs, phase, weights_model,
            class_weight=None, example_losses=None):
        """Trains `training_model` (compiled) from the resume point to `epochs`.

        Restores the optimizer state the same phase left in the checkpoint, then
        runs Keras' `fit`, or our own loop across machines (`distributed_fit`,
        with `example_losses`). Each epoch appends its `history.csv` row, and
        the chief checkpoints `weights_model` (what the phase trains).
        """
        config, workers, state = self.config, self.workers, self.state
        # Only the same phase trained on the same model (activations or images)
        # left an optimizer state that fits.
        if (state and state["phase"] == phase
                and state.get("training_model") == training_model.name):
            with workers.strategy.scope():  # Its variables are the strategy's.
                restored = restore_optimizer(training_model, state)
            if not restored:
                say(config, "warning: the optimizer state in the checkpoint does "
                            "not fit; it starts afresh")
        initial_epoch = max(self.start, config.epochs if phase == "fine_tune" else 0)
        callbacks = [HistoryCSV(self.history_path, phase)]
        if workers.is_chief:  # Only the chief's checkpoint is resumed from.
            callbacks.append(self.checkpoint.callback(weights_model, training_model,
                                                      phase))
        if not workers.own_loop:
            return training_model.fit(
                train, validation_data=validation, epochs=epochs,
                initial_epoch=initial_epoch, callbacks=callbacks,
                class_weight=class_weight, verbose=config.verbose,
            )
        return distributed_fit(
            workers, training_model,
            workers.lockstep(train, self.totals["train"], config.batch_size),
            workers.lockstep(validation, self.totals["validation"], config.batch_size),
            epochs=epochs, initial_epoch=initial_epoch, callbacks=callbacks,
            class_weight=class_weight, verbose=config.verbose,
            example_losses=example_losses,
        )


def worker_run_dir(config, workers: Workers) -> str:
    """This worker's run folder: the chief's is `config.output`.

    Across machines the other workers keep their history and data report in
    `RUN_DIR/.worker-N` until the run ends.
    """
    run_dir = os.path.abspath(config.output)
    if workers.is_chief:
        return run_dir
    return os.path.join(run_dir, f"{WORKER_FOLDER_PREFIX}{workers.index}")


def resume_state(config, workers: Workers, checkpoint: RunCheckpoint
                 ) -> Optional[dict]:
    """The state to resume from (`RunCheckpoint.load`'s), or `None` to start.

    Only the chief's checkpoint counts: across machines every worker resumes
    from it, and the chief refuses a worker with other settings. They must
    agree on the dtype policy too, which `auto` may set apart: float16 steps
    take an extra collective op (see `distributed_fit`).
    """
    state = None if config.overwrite or not workers.is_chief else checkpoint.load()
    return workers.share_state(state, {
        **checkpoint.settings, "dtype_policy": keras.config.dtype_policy().name})


def prepare_run_folder(config, workers: Workers, output: str,
                       checkpoint: RunCheckpoint, state: Optional[dict],
                       report: dict) -> str:
    """Readies `output` to train into; returns the path of its `history.csv`.

    Marks the run unfinished (no `metrics.json`), puts back an export a kill
    interrupted, removes partial files, and either starts afresh (no
    checkpoint, no history) or cuts the history back to `state`'s epoch. Then
    writes the data report.
    """
    history_path = os.path.join(output, "history.csv")
    os.makedirs(output, exist_ok=True)
    _remove(os.path.join(output, "metrics.json"))  # The folder is unfinished now.
    recover_interrupted(os.path.join(output, "saved_model"))
    checkpoint.remove_temporaries()
    _remove(os.path.join(output, "model.keras.partial.keras"))
    if state is None:
        checkpoint.clear()
        _remove(history_path)
    else:
        truncate_history(history_path, state["epoch"])
        where = checkpoint.path if workers.is_chief else "the chief's checkpoint"
        say(config, f"Resuming from epoch {state['epoch']} ({where})")
    write_json_atomically(os.path.join(output, "data_report.json"), report)
    return history_path


class _Phases:
    """Runs the head phase and the fine-tuning phase of `train_run`, resumably.

    Args are those of `train_run`'s locals; see its docstring for the behaviour.
    `folder` and `data` are this worker's share of the images (all of them on
    one machine), `all_files` the whole `ImageFolder`.
    """

    def __init__(self, config, model, folder, data, run: Resumable, all_files):
        self.config = config
        self.workers = run.workers
        self.run = run
        self.model = model
        self.backbone = model.get_layer("backbone")
        self.head = model.get_layer("head")
        self.folder = folder
        self.data = data
        self.start = run.start
        self.cache_dir = None
        if config.cache and not config.augment:
            self.cache_dir = config.cache_dir or default_cache_dir()
        self.report = {}
        self.xla = {}  # Which stage ran with XLA, for the summary.
        self.class_weight = None
        if config.class_weight == "auto":
            _, labels = all_files.paths_and_labels("train")
            self.class_weight = balanced_class_weights(labels, len(folder.class_names))

    def _say(self, message):
        say(self.config, message)

    def _fit(self, training_model, train, validation, epochs, phase,
             weights_model=None):
        """`Resumable.fit`, checkpointing the whole model unless told otherwise."""
        return self.run.fit(training_model, train, validation, epochs, phase,
                            weights_model or self.model, self.class_weight)

    def _jit(self, stage, model):
        """`jit_for` the run's `--jit` setting; remembered for the summary."""
        # Across machines the training steps are our own, never compiled by XLA.
        own_step = self.workers.own_loop and stage != "forward"
        self.xla[stage] = not own_step and jit_for(self.config.jit, model)
        return self.xla[stage]

    def _outputs(self, network, cache, split, keep=True):
        files = self.folder.used(split)
        outputs, stats = cached_outputs(
            network,
            [f.path for f in files],
            [f.digest for f in files],
            self.config.image_size,
            cache,
            self.config.batch_size,
            keep=keep,
            verbose=self.config.verbose,
            jit_compile=self._jit("forward", network),
        )
        for name, value in stats._asdict().items():
            self.report[name] = self.report.get(name, 0) + value
        return outputs

    def _say_cache(self, what, cache):
        where = f" (cache: {cache.directory})" if cache else " (no cache)"
        self._say(
            f"{what}: {self.report.get('hits', 0)} from cache, "
            f"{self.report.get('computed', 0)} computed, "
            f"{self.report.get('rebuilt', 0)} corrupt entries rebuilt{where}"
        )

    def head_phase(self):
        config = self.config
        if self.start >= config.epochs:
            return
        if config.augment:
            # Random views change every epoch: the backbone runs on each of them.
            compile_classifier(self.model, config.learning_rate,
                               self._jit("head", self.model))
            self._fit(self.model, self.data.train, self.data.validation,
                      config.epochs, "head")
            return
        spec = get_backbone_spec(config.backbone)
        cache = self.cache_dir and open_cache(
            self.cache_dir,
            feature_cache_key(
                self.backbone, f"{spec.name}:alpha={config.alpha}", config.image_size,
                spec.preprocessing,
            ),
            verbose=config.verbose != 0,
        )
        self._say("Computing backbone features ...")
        features = {
            split: (self._outputs(self.backbone, cache, split),
                    self.folder.paths_and_labels(split)[1])
            for split in ("train", "validation")
        }
        self._say_cache("Features", cache)
        compile_classifier(self.head, config.learning_rate,
                           self._jit("head", self.head))
        self._fit(
            self.head,
            feature_dataset(*features["train"], config.batch_size, shuffle=True,
                            seed=config.seed),
            feature_dataset(*features["validation"], config.batch_size),
            config.epochs,
            "head",
            weights_model=self.head,
        )

    def fine_tune_phase(self) -> bool:
        """Returns True when it trained on cached activations (float16)."""
        config = self.config
        end = config.epochs + config.fine_tune_epochs
        if config.fine_tune_epochs == 0 or self.start >= end:
            return False
        num_layers = config.fine_tune_layers or default_fine_tune_layers(self.backbone)
        unfreeze_top(self.backbone, num_layers)
        training_model = self.model
        train, validation = self.data.train, self.data.validation
        cut = split_backbone(self.backbone, num_layers) if self.cache_dir else None
        if self.cache_dir and cut is None:
            self._say(f"The {config.backbone} graph cannot be cut below its top "
                      f"{num_layers} layers; fine-tuning runs on the images.")
        cache = None
        if cut is not None:
            bottom, top = cut
            spec = get_backbone_spec(config.backbone)
            # float16 halves the disk and reads of activations, which are big.
            cache = open_cache(
                self.cache_dir,
                feature_cache_key(
                    bottom, f"{spec.name}:alpha={config.alpha}", config.image_size,
                    spec.preprocessing, cut=[len(top.layers), list(top.input.shape)],
                ),
                dtype="float16",
                verbose=config.verbose != 0,
            )
        if cache is not None:
            self.report = {}
            self._say(f"Computing activations below the top {num_layers} layers ...")
            for split in ("train", "validation"):
                self._outputs(bottom, cache, split, keep=False)
            if not all(os.path.exists(cache.path(f.digest))
                       for split in ("train", "validation")
                       for f in self.folder.used(split)):
                self._say("Some activations could not be cached (a file changed, "
                          "or the cache could not be written); fine-tuning runs "
                          "on the images.")
                cache = None
        if cut is not None and not self.workers.everyone(cache is not None):
            # Every worker must build the same model and take the same steps.
            if cache is not None:
                self._say("Another worker could not cache its activations; "
                          "fine-tuning runs on the images.")
            cache = None
        if cache is not None:
            shape = tuple(top.input.shape[1:])
            splits = {}
            for split, shuffle in (("train", True), ("validation", False)):
                files = self.folder.used(split)
                splits[split] = cache.dataset(
                    [f.digest for f in files],
                    np.array([f.label for f in files], "int32"),
                    shape,
                    config.batch_size,
                    shuffle=shuffle,
                    seed=config.seed,
                )
            self._say_cache("Activations", cache)
            train, validation = splits["train"], splits["validation"]
            inputs = keras.Input(shape, name="activations")
            logits = self.head(top(inputs, training=False))
            training_model = keras.Model(inputs, logits, name="classifier_top")
        compile_classifier(training_model, config.fine_tune_learning_rate,
                           self._jit("fine_tune", training_model))
        self._fit(training_model, train, validation, end, "fine_tune")
        self.backbone.trainable = False
        return cache is not None


def begin_run(config, output: Optional[str] = None) -> tuple:
    """Checks the run folder and the data of a `train` or `distill` run.

    Everything that can fail on the user's input fails here, before anything is
    written. `output` defaults to `config.output`. Returns `(output folder,
    ImageFolder, data report)`.
    """
    output = os.path.abspath(output or config.output)
    check_run_folder(output, config.overwrite)
    keras.utils.set_random_seed(config.seed)
    say(config, f"Checking images in {config.data_dir} ...")
    folder = scan_image_folder(config.data_dir, config.validation_split, config.seed,
                               progress=config.verbose != 0)
    report = data_report(folder)
    say(config, summarize_data(report))
    return output, folder, report


def write_model_files(model: keras.Model, output: str, class_names: list) -> str:
    """Writes `model.keras`, `labels.txt` and `saved_model/`; returns the latter."""
    save_keras_model(model, os.path.join(output, "model.keras"))
    write_labels(os.path.join(output, "labels.txt"), class_names)
    return export_saved_model(
        model, os.path.join(output, "saved_model"), class_names, overwrite=True
    )


def dtype_policy(mixed_precision: str) -> str:
    """The Keras dtype policy for a `mixed_precision` setting (see `TrainConfig`)."""
    if mixed_precision == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        capable = [
            gpu for gpu in gpus
            if tf.config.experimental.get_device_details(gpu).get(
                "compute_capability", (0, 0)) >= (7, 0)
        ]
        return "mixed_float16" if capable else "float32"
    return {"off": "float32", "float16": "mixed_float16",
            "bfloat16": "mixed_bfloat16"}[mixed_precision]


@contextlib.contextmanager
def dtype_policy_scope(mixed_precision: str):
    """Sets Keras' global dtype policy for `mixed_precision`, then restores it.

    Args:
        mixed_precision: `"auto"`, `"off"`, `"float16"` or `"bfloat16"` (see
            `TrainConfig`).

    Yields:
        The policy's name, e.g. `"mixed_float16"`.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype_policy(mixed_precision))
    try:
        yield keras.config.dtype_policy().name
    finally:
        keras.config.set_dtype_policy(previous)


def train_run(config: TrainConfig) -> dict:
    """Trains a classifier on an image folder and writes a complete run folder.

    See `_train_run`. The strategy (`config.strategy`) is made first, since a
    multi-worker strategy must configure TensorFlow before it runs anything.
    The dtype policy chosen by `config.mixed_precision` holds while the run
    builds and trains its model, and the previous global policy is restored
    afterwards.
    """
    workers = Workers.of(make_strategy(config.strategy))
    with dtype_policy_scope(config.mixed_precision), workers.reporting_lost_peers():
        return _train_run(config, workers)


def _train_run(config: TrainConfig, workers: Workers) -> dict:
    """Trains a classifier on an image folder and writes a complete run folder.

    The head is trained on backbone features computed once per image and kept in
    a cache on disk (`config.cache_dir`), so a second run on the same images and
    backbone skips the backbone altogether. The fine-tuning phase, if any, trains
    the top of the backbone from cached activations of the frozen bottom. With
    `augment=True` nothing is cached: every epoch sees new random views.

    A checkpoint is written after every epoch. When `config.output` holds an
    unfinished run with the same settings and data, it resumes from its last
    finished epoch; with other settings it is refused unless `overwrite`.

    Across machines (`workers.own_loop`), each worker computes the features of
    its share of the images and trains on them in step with the others; the
    chief writes the run folder and the checkpoint every worker resumes from;
    the others keep their history in `RUN_DIR/.worker-N` until the run ends.

    Returns:
        The summary written to `metrics.json`: `val_accuracy`, `seconds`,
        `num_classes`, `class_names`, `saved_model` and more.

    Raises:
        DataError: the data folder is unusable (see `scan_image_folder`).
        RunFolderError: `config.output` holds a finished run, or an unfinished
            one with other settings, and `overwrite` is False.
    """
    start = time.perf_counter()
    output, folder, report = begin_run(config, worker_run_dir(config, workers))
    imbalance = class_imbalance(report)
    if imbalance > IMBALANCE_WARNING:
        advice = ("" if config.class_weight == "auto"
                  else "; consider --class-weight auto (class_weight='auto')")
        say(config, f"warning: the training classes are imbalanced "
                    f"{imbalance:.1f}:1 (largest to smallest){advice}")
    checkpoint = RunCheckpoint(output, run_settings(config, folder))
    state = resume_state(config, workers, checkpoint)
    with workers.strategy.scope():
        backbone = load_backbone(config.backbone, config.weights, config.image_size,
                                 config.alpha)
    if config.fine_tune_layers is not None and hub_layer(backbone) is None:
        available = len(backbone_network(backbone).layers)
        if config.fine_tune_layers > available:
            raise ValueError(
                f"`fine_tune_layers` must be at most {available}, the layers of "
                f"{config.backbone}. Received: fine_tune_layers="
                f"{config.fine_tune_layers}"
            )
    weights_used = config.weights if config.weights is not None else "none (random)"
    say(config, f"Backbone {config.backbone} ({backbone.count_params():,} "
                f"parameters), weights: {weights_used}, image size {config.image_size}")
    history_path = prepare_run_folder(config, workers, output, checkpoint, state,
                                      report)
    # Outside the strategy's scope: the random layers' seed state lives in the
    # tf.data pipeline, not among the replicated variables.
    augment = augmentation_layers(config.seed) if config.augment else None
    share = workers.shard(folder)
    data = image_folder_datasets(
        config.data_dir,
        config.image_size,
        config.batch_size,
        seed=config.seed,
        augment=augment,
        folder=share,
        # Keras' fit under MirroredStrategy peeks at a batch through an iterator
        # of its own, which would decode a whole split into memory and drop it.
        memory_budget=0 if workers.name == "mirrored" else DECODED_CACHE_BYTES,
    )
    with workers.strategy.scope():
        model = build_classifier(backbone, len(folder.class_names), config.dropout)
        if state is not None:
            # Head-phase checkpoints hold the head only: the backbone is unchanged.
            restore_weights(model, state)
        totals = {split: len(folder.used(split)) for split in ("train", "validation")}
        run = Resumable(config, workers, checkpoint, state, history_path, totals)
        phases = _Phases(config, model, share, data, run, folder)
        phases.head_phase()
        head_report = dict(phases.report)
        from_activations = phases.fine_tune_phase()
    history = read_history(history_path)
    if not workers.is_chief:
        return end_worker(config, workers, output, history, start, state, model)
    if share is not folder:
        data = image_folder_datasets(config.data_dir, config.image_size,
                                     config.batch_size, folder=folder)
    if workers.strategy is not tf.distribute.get_strategy():
        model = plain_copy(model, config.backbone, config.image_size, config.alpha,
                           config.dropout)
    metrics = {
        "val_accuracy": history["val_accuracy"][-1],
        "val_loss": history["val_loss"][-1],
    }
    evaluations = {}
    if config.fine_tune_epochs > 0 and phases.cache_dir:
        # The top may have trained on float16 activations (in this process or
        # before a resume): report what the full model, as exported, scores on
        # the validation images.
        evaluations["validation"] = data.validation
    if data.test is not None:
        evaluations["test"] = data.test
    for split, dataset in evaluations.items():
        prefix = {"validation": "val"}.get(split, split)
        loss, accuracy = evaluate_classifier(model, dataset)
        metrics.update({f"{prefix}_accuracy": accuracy, f"{prefix}_loss": loss})

    saved_model = write_model_files(model, output, folder.class_names)
    counts = report["counts"]
    summary = {
        **metrics,
        "seconds": round(time.perf_counter() - start, 2),
        "num_classes": len(folder.class_names),
        "class_names": folder.class_names,
        "num_train": sum(counts.get("train", {}).values()),
        "num_validation": sum(counts.get("validation", {}).values()),
        "num_skipped": len(folder.skipped()),
        "run_dir": output,
        "saved_model": saved_model,
        "model": os.path.join(output, "model.keras"),
        "backbone": config.backbone,
        "alpha": config.alpha,
        "weights": str(config.weights) if config.weights is not None else None,
        "image_size": config.image_size,
        "epochs": config.epochs,
        "fine_tune_epochs": config.fine_tune_epochs,
        "augment": config.augment,
        "dtype_policy": keras.config.dtype_policy().name,
        "strategy": workers.name,
        "num_replicas_in_sync": workers.num_replicas_in_sync,
        "num_workers": workers.count,
        "is_chief": True,
        # Across machines, the other workers' summaries say the same.
        "weights_sha256": weights_fingerprint(model) if workers.count > 1 else None,
        "xla": phases.xla,
        "class_weight": phases.class_weight,
        "class_imbalance": imbalance,
        "resumed_from_epoch": state["epoch"] if state else None,
        "feature_cache": phases.cache_dir,
        "features": head_report,
        "fine_tune_activations": phases.report if from_activations else None,
        "history": history,
    }
    write_json_atomically(os.path.join(output, "metrics.json"), summary)
    checkpoint.clear()
    return summary


def end_worker(config, workers, output, history, start, state, model) -> dict:
    """A worker other than the chief removes its folder and reports briefly."""
    shutil.rmtree(output, ignore_errors=True)
    return {
        "val_accuracy": history["val_accuracy"][-1],
        "val_loss": history["val_loss"][-1],
        "seconds": round(time.perf_counter() - start, 2),
        "resumed_from_epoch": state["epoch"] if state else None,
        "is_chief": False,
        "worker": workers.index,
        "run_dir": os.path.abspath(config.output),
        "saved_model": None,
        "strategy": workers.name,
        "num_replicas_in_sync": workers.num_replicas_in_sync,
        "num_workers": workers.count,
        # The chief's says the same when all workers trained the same model.
        "weights_sha256": weights_fingerprint(model),
        "history": history,
    }


def plain_copy(model: keras.Model, backbone: str, image_size: int,
               alpha: Optional[float], dropout: float) -> keras.Model:
    """The trained classifier rebuilt outside any strategy, for saving.

    `backbone`, `image_size`, `alpha` and `dropout` are those it was built with.

    A model built under a strategy holds distributed variables; saving a plain
    copy keeps the exported files free of them, and keeps the chief's saving
    free of collective ops the other workers would have to join.
    """
    network = load_backbone(backbone, None, image_size, alpha)
    copy = build_classifier(network, int(model.outputs[0].shape[-1]), dropout)
    # Built the same way and frozen the same way, the two list their weights
    # in the same order (names may differ: Keras numbers repeated layer names).
    if [tuple(v.shape) for v in copy.weights] != [tuple(v.shape) for v in model.weights]:
        raise RuntimeError("The classifier cannot be rebuilt for saving: its "
                           "weights differ from a freshly built one's.")
    for target, source in zip(copy.weights, model.weights):
        target.assign(source.numpy())
    return copy


def evaluate_classifier(model: keras.Model, dataset) -> tuple:
    """Loss and accuracy of `model` on `(pixels, label)` batches.

    Not `model.evaluate`, which needs `compile`, and a compiled model would be
    saved to `model.keras` with an optimizer it never used.
    """
    loss = keras.metrics.Mean()
    accuracy = keras.metrics.SparseCategoricalAccuracy()
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None
    )
    for pixels, labels in dataset:
        logits = model(pixels, training=False)
        loss.update_state(cross_entropy(labels, logits))
        accuracy.update_state(labels, logits)
    return float(loss.result()), float(accuracy.result())


def save_keras_model(model: keras.Model, path: str) -> None:
    """Saves to a temporary file, then renames: a kill never leaves half a file."""
    tmp = path + ".partial.keras"
    model.save(tmp)
    os.replace(tmp, path)

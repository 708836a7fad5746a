"""A distillation run: a teacher model and an image folder in, a run folder out.

Same run-folder layout as `train_run` (`saved_model/`, `model.keras`,
`labels.txt`, `history.csv`, `data_report.json`, `metrics.json` last). The
teacher's logits for each image are computed once and cached; with the student's
backbone frozen (the default), its features are cached too (the same entries as
`train` uses), and the `Distiller` trains the student's head on
`(features, teacher logits, label)`. Like a `train` run, a killed distillation
resumes from its last finished epoch (`RUN_DIR/checkpoint.npz`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf

from tftransfer.backbones import get_backbone_spec, load_backbone
from tftransfer.cache import (
    cached_outputs,
    default_cache_dir,
    feature_cache_key,
    open_cache,
    weights_fingerprint,
)
from tftransfer.checkpoint import RunCheckpoint, restore_weights
from tftransfer.data import RESIZE_METHOD, decode_image
from tftransfer.distill import INPUTS, TEACHER_LOGITS, Distiller
from tftransfer.distribute import STRATEGIES, Workers, make_strategy
from tftransfer.errors import DataError, TransferError, check_choice
from tftransfer.heads import build_classifier
from tftransfer.run import (
    PRECISIONS,
    Resumable,
    begin_run,
    dtype_policy_scope,
    end_worker,
    plain_copy,
    prepare_run_folder,
    read_history,
    resume_state,
    run_settings,
    safe_name,
    say,
    worker_run_dir,
    write_json_atomically,
    write_model_files,
)
from tftransfer.train import (
    JIT_SETTINGS,
    default_fine_tune_layers,
    jit_for,
    unfreeze_top,
)


class Teacher(NamedTuple):
    """A loaded teacher: see `load_teacher`."""

    forward: Callable  # pixels (raw bytes when image_size is None) -> logits
    model: Optional[keras.Model]
    class_names: Optional[list]
    image_size: Optional[int]
    fingerprint: str
    path: str
    num_classes: Optional[int] = None


def _read_labels(path: str) -> Optional[list]:
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def load_teacher(path: str) -> Teacher:
    """Loads a teacher from a run folder, a `.keras` file or a SavedModel.

    A run folder or `.keras` file gives a Keras model taking pixels 0..255 and
    returning logits. A tftransfer SavedModel is called through its raw-bytes
    signature, so it decodes images exactly as it does when serving; its logits
    are the log of its probabilities (equal to the logits up to a constant, which
    softmax ignores).

    Raises:
        TransferError: `path` is none of these.
    """
    path = os.path.abspath(os.fspath(path))
    model_file = os.path.join(path, "model.keras") if os.path.isdir(path) else path
    if model_file.endswith(".keras") and os.path.isfile(model_file):
        import tftransfer  # noqa: F401  (registers ImagePreprocessing for loading)

        try:
            model = keras.saving.load_model(model_file, compile=False)
        except ValueError as error:
            # A hub backbone cannot load in Keras' safe mode; the run's
            # SavedModel serves the same model without that risk.
            saved_model = os.path.join(os.path.dirname(model_file), "saved_model")
            if "safe_mode" not in str(error) or not os.path.isdir(saved_model):
                raise
            return load_teacher(saved_model)
        model.trainable = False
        labels = _read_labels(os.path.join(os.path.dirname(model_file), "labels.txt"))
        return Teacher(
            lambda pixels: model(pixels, training=False),
            model,
            labels,
            int(model.input_shape[1]),
            weights_fingerprint(model),
            model_file,
            int(model.output_shape[-1]),
        )
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        loaded = tf.saved_model.load(path)
        if "serving_default" not in loaded.signatures:
            raise TransferError(f"The SavedModel {path} has no serving_default signature.")
        signature = loaded.signatures["serving_default"]
        if "probabilities" not in signature.structured_outputs:
            raise TransferError(
                f"The SavedModel {path} is not a tftransfer export: its "
                "serving_default signature returns no 'probabilities'. Give a run "
                "folder, a .keras file or a tftransfer SavedModel."
            )

        def forward(image_bytes):
            probabilities = signature(image_bytes=image_bytes)["probabilities"]
            return tf.math.log(tf.maximum(probabilities, 1e-12))

        return Teacher(forward, None,
                       _read_labels(os.path.join(path, "assets", "labels.txt")),
                       None, weights_fingerprint(loaded.variables), path,
                       signature.structured_outputs["probabilities"].shape[-1])
    raise TransferError(
        f"No teacher model at {path}. Expected a tftransfer run folder, a .keras "
        "file or a tftransfer SavedModel folder."
    )


@dataclasses.dataclass
class DistillConfig:
    """Settings of `distill_run`; the command line's `distill` options.

    Args:
        data_dir: Folder of class folders (or of train/ and val/ split folders).
        teacher: A run folder, `.keras` file or SavedModel (see `load_teacher`).
        output: The run folder. Defaults to `saved_models/<data>-distilled-<student>`.
        student: Student backbone name. Defaults to `"mobilenet_v2"`.
        alpha: Student width multiplier. Defaults to `None`.
        weights: Student backbone weights. Defaults to `"imagenet"`.
        image_size: Defaults to the teacher's input size (the student
            backbone's default for a SavedModel teacher).
        temperature: Defaults to `3.0`.
        student_loss_weight: Weight of the hard-label loss. Defaults to `0.5`.
        epochs: Epochs with the student's backbone frozen. Defaults to `5`.
        fine_tune_epochs: Epochs with the top of its backbone unfrozen.
            Defaults to `0`.
        batch_size: Defaults to `32`.
        learning_rate: Defaults to `1e-3` (`/10` while fine-tuning).
        validation_split: Used when the data has no split folders.
        seed: Defaults to `0`.
        dropout: Head dropout. Defaults to `0.2`.
        cache_dir: Defaults to `default_cache_dir()`.
        cache: Keep teacher logits and student features on disk. Defaults to `True`.
        mixed_precision: `"auto"`, `"off"`, `"float16"` or `"bfloat16"`: the
            Keras dtype policy of the student's backbone while distilling, as
            for `TrainConfig`. The student's head and its logits stay float32;
            under float16 the `Distiller` scales the loss. Defaults to `"auto"`.
        jit: `"auto"`, `"on"` or `"off"`: compile the forward passes and the
            `Distiller`'s steps with XLA, as for `TrainConfig`; `auto` uses it
            where it was measured to pay (see `jit_for`). Defaults to `"auto"`.
        strategy: `"auto"`, `"default"`, `"mirrored"` or `"multi_worker"`:
            the `tf.distribute` strategy the student trains under, as for
            `TrainConfig` (`batch_size` is the global batch). Across machines
            each worker computes the teacher's logits and the student's
            features for its share of the images, and the chief writes the
            run folder. Defaults to `"auto"`.
        overwrite: Replace a finished run, or start an unfinished one over.
            Defaults to `False`.
        verbose: Defaults to `"auto"`.
    """

    data_dir: str
    teacher: str
    output: Optional[str] = None
    student: str = "mobilenet_v2"
    alpha: Optional[float] = None
    weights: Optional[str] = "imagenet"
    image_size: Optional[int] = None
    temperature: float = 3.0
    student_loss_weight: float = 0.5
    epochs: int = 5
    fine_tune_epochs: int = 0
    batch_size: int = 32
    learning_rate: float = 1e-3
    validation_split: float = 0.2
    seed: int = 0
    dropout: float = 0.2
    cache_dir: Optional[str] = None
    cache: bool = True
    mixed_precision: str = "auto"
    jit: str = "auto"
    strategy: str = "auto"
    overwrite: bool = False
    verbose: object = "auto"

    def __post_init__(self):
        if self.epochs < 0 or self.fine_tune_epochs < 0:
            raise ValueError("`epochs` and `fine_tune_epochs` must be >= 0.")
        if self.epochs + self.fine_tune_epochs == 0:
            raise ValueError("Nothing to train: `epochs` and `fine_tune_epochs` are 0.")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1. Received: {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(
                f"`learning_rate` must be > 0. Received: {self.learning_rate}"
            )
        if not self.temperature > 0:
            raise ValueError(
                f"`temperature` must be > 0. Received: temperature={self.temperature}"
            )
        if not 0 <= self.student_loss_weight <= 1:
            raise ValueError(
                "`student_loss_weight` must be between 0 and 1. "
                f"Received: student_loss_weight={self.student_loss_weight}"
            )
        check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        check_choice("jit", self.jit, JIT_SETTINGS)
        check_choice("strategy", self.strategy, STRATEGIES)
        self.student = get_backbone_spec(self.student).name
        if self.output is None:
            data_name = os.path.basename(os.path.normpath(self.data_dir)) or "data"
            self.output = os.path.join(
                "saved_models", f"{data_name}-distilled-{safe_name(self.student)}"
            )


def _check_teacher(teacher: Teacher, class_names: list, image_size) -> None:
    if teacher.class_names is not None and teacher.class_names != class_names:
        raise DataError(
            f"The teacher's classes {teacher.class_names} differ from the data's "
            f"class folders {class_names}. Distil on the data the teacher was "
            "trained for, with the same class folders."
        )
    outputs = teacher.num_classes
    if outputs is not None:
        if outputs != len(class_names):
            raise DataError(
                f"The teacher has {outputs} outputs but the data has "
                f"{len(class_names)} classes ({class_names})."
            )
    if image_size and teacher.image_size and image_size != teacher.image_size:
        raise ValueError(
            f"The teacher takes {teacher.image_size} px images, the student was asked "
            f"for {image_size} px. Leave out --image-size to use the teacher's size."
        )


def _dataset(inputs, teacher_logits, labels, batch_size, shuffle, seed, decode=None):
    dataset = tf.data.Dataset.from_tensor_slices(
        ({INPUTS: inputs, TEACHER_LOGITS: teacher_logits}, labels)
    )
    if shuffle:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if decode is not None:
        dataset = dataset.map(
            lambda x, y: ({**x, INPUTS: decode(tf.io.read_file(x[INPUTS]))}, y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def distill_run(config: DistillConfig) -> dict:
    """Distils a teacher into a student on an image folder; writes a run folder.

    The dtype policy chosen by `config.mixed_precision` holds while the run
    builds and trains the student, and the previous global policy is restored
    afterwards.

    Returns:
        The summary written to `metrics.json`, as `train_run`'s, plus
        `teacher`, `teacher_val_accuracy`, `temperature`, `student_loss_weight`.

    Raises:
        DataError: unusable data, or a teacher with other classes.
        ValueError: a student image size the teacher does not take.
        RunFolderError: `config.output` holds a finished run, or an
            unfinished one with other settings (a `train` run's among them),
            and `config.overwrite` is False.
    """
    workers = Workers.of(make_strategy(config.strategy))
    with dtype_policy_scope(config.mixed_precision), workers.reporting_lost_peers():
        return _distill_run(config, workers)


def _distill_run(config: DistillConfig, workers: Workers) -> dict:
    start = time.perf_counter()
    output, folder, report = begin_run(config, worker_run_dir(config, workers))
    teacher = load_teacher(config.teacher)
    _check_teacher(teacher, folder.class_names, config.image_size)
    # The same teacher wherever its file is, for resuming and for every worker.
    settings = {**run_settings(config, folder), "teacher": teacher.fingerprint}
    checkpoint = RunCheckpoint(output, settings)
    # A checkpoint with other settings (a `train` run's among them) is refused.
    state = resume_state(config, workers, checkpoint)
    spec = get_backbone_spec(config.student)
    image_size = config.image_size or teacher.image_size or spec.default_image_size
    with workers.strategy.scope():
        backbone = load_backbone(config.student, config.weights, image_size,
                                 config.alpha)
        model = build_classifier(backbone, len(folder.class_names), config.dropout)
        if state is not None:
            # Head-phase checkpoints hold the head only: the backbone is unchanged.
            restore_weights(model, state)
    history_path = prepare_run_folder(config, workers, output, checkpoint, state,
                                      report)

    cache_dir = (config.cache_dir or default_cache_dir()) if config.cache else None
    verbose = config.verbose != 0
    teacher_cache = cache_dir and open_cache(cache_dir, {
        "network": "teacher logits", "weights": teacher.fingerprint,
        "image_size": teacher.image_size, "preprocessing": "teacher's own",
        "resize": RESIZE_METHOD, "dtype_policy": keras.config.dtype_policy().name,
        "versions": [tf.__version__, keras.__version__],
    }, verbose=verbose)
    student_cache = cache_dir and open_cache(cache_dir, feature_cache_key(
        backbone, f"{spec.name}:alpha={config.alpha}", image_size, spec.preprocessing,
    ), verbose=verbose)
    splits = ("train", "validation")
    share = workers.shard(folder)  # All of it on one machine.
    files = {split: share.used(split) for split in splits}
    labels = {split: share.paths_and_labels(split)[1] for split in splits}
    run = Resumable(config, workers, checkpoint, state, history_path,
                    totals={split: len(folder.used(split)) for split in splits})
    # This worker's cache hits and computed entries, per network, for the summary.
    counts = {"teacher": {}, "forward": {}}
    xla = {}  # Which stage ran with XLA, for the summary.

    def outputs(network, size, cache, split, stage):
        # A SavedModel teacher (size None) runs its own graph: XLA is not ours.
        with workers.strategy.scope():  # `auto` is off under a strategy.
            xla[stage] = size is not None and jit_for(config.jit, network)
        result, stats = cached_outputs(
            network, [f.path for f in files[split]], [f.digest for f in files[split]],
            size, cache, config.batch_size, verbose=config.verbose,
            jit_compile=xla[stage],
        )
        for name, value in stats._asdict().items():
            counts[stage][name] = counts[stage].get(name, 0) + value
        return result

    say(config, "Computing the teacher's logits ...")
    network = teacher.model if teacher.model is not None else teacher.forward
    logits = {s: outputs(network, teacher.image_size, teacher_cache, s, "teacher")
              for s in splits}
    correct, seen = workers.total([
        np.sum(logits["validation"].argmax(-1) == labels["validation"]),
        len(labels["validation"])])
    teacher_accuracy = float(correct / max(seen, 1.0))
    say(config, f"Teacher: val_accuracy {teacher_accuracy:.4f}; logits "
                f"{counts['teacher']['hits']} from cache, "
                f"{counts['teacher']['computed']} computed")
    distill_settings = dict(temperature=config.temperature,
                            student_loss_weight=config.student_loss_weight)

    def jit(network):
        # Across machines the training steps are our own, never compiled by XLA.
        return not workers.own_loop and jit_for(config.jit, network)

    def fit(distiller, weights_model, inputs, epochs, phase, decode=None):
        train, validation = (
            _dataset(inputs[s], logits[s], labels[s], config.batch_size,
                     s == "train", config.seed, decode) for s in splits)
        run.fit(distiller, train, validation, epochs, phase, weights_model,
                example_losses=distiller.example_losses)

    if run.start < config.epochs:
        say(config, "Computing the student's backbone features ...")
        features = {s: outputs(backbone, image_size, student_cache, s, "forward")
                    for s in splits}
        say(config, f"Student features: {counts['forward']['hits']} from cache, "
                    f"{counts['forward']['computed']} computed")
        # Every batch carries the teacher's logits: the Distiller needs no teacher.
        with workers.strategy.scope():
            distiller = Distiller(None, model.get_layer("head"), **distill_settings,
                                  name="head_distiller")
            distiller.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                              jit_compile=jit(model.get_layer("head")))
            xla["head"] = distiller.jit_compile  # What Keras will use.
        fit(distiller, model.get_layer("head"), features, config.epochs, "head")
    if config.fine_tune_epochs > 0:
        unfreeze_top(backbone, default_fine_tune_layers(backbone))
        with workers.strategy.scope():
            distiller = Distiller(None, model, **distill_settings,
                                  name="fine_tune_distiller")
            distiller.compile(
                optimizer=keras.optimizers.Adam(config.learning_rate / 10),
                jit_compile=jit(model))
            xla["fine_tune"] = distiller.jit_compile

        def decode(contents):
            return decode_image(contents, image_size)

        paths = {s: [f.path for f in files[s]] for s in splits}
        fit(distiller, model, paths, config.epochs + config.fine_tune_epochs,
            "fine_tune", decode)
        backbone.trainable = False
    history = read_history(history_path)
    cache_counts = {"teacher_logits": counts["teacher"],
                    "features": counts["forward"] or None}
    if not workers.is_chief:
        return {**end_worker(config, workers, output, history, start, state, model),
                "teacher_val_accuracy": teacher_accuracy, **cache_counts}

    if workers.strategy is not tf.distribute.get_strategy():
        # Saved free of the strategy's distributed variables.
        model = plain_copy(model, config.student, image_size, config.alpha,
                           config.dropout)
    saved_model = write_model_files(model, output, folder.class_names)
    summary = {
        "val_accuracy": history["val_accuracy"][-1],
        "val_loss": history["val_loss"][-1],
        "teacher_val_accuracy": teacher_accuracy,
        "seconds": round(time.perf_counter() - start, 2),
        "num_classes": len(folder.class_names),
        "class_names": folder.class_names,
        "num_train": run.totals["train"],
        "num_validation": run.totals["validation"],
        "num_skipped": len(folder.skipped()),
        "run_dir": output,
        "saved_model": saved_model,
        "model": os.path.join(output, "model.keras"),
        "teacher": teacher.path,
        "backbone": config.student,
        "alpha": config.alpha,
        "weights": str(config.weights) if config.weights is not None else None,
        "image_size": image_size,
        "epochs": config.epochs,
        "fine_tune_epochs": config.fine_tune_epochs,
        **distill_settings,
        "dtype_policy": keras.config.dtype_policy().name,
        "xla": xla,
        "strategy": workers.name,
        "num_replicas_in_sync": workers.num_replicas_in_sync,
        "num_workers": workers.count,
        "is_chief": True,
        # Across machines, the other workers' summaries say the same.
        "weights_sha256": weights_fingerprint(model) if workers.count > 1 else None,
        "resumed_from_epoch": state["epoch"] if state else None,
        "feature_cache": cache_dir,
        **cache_counts,
        "history": history,
    }
    write_json_atomically(os.path.join(output, "metrics.json"), summary)
    checkpoint.clear()
    return summary

"""A distillation run: a teacher model and an image folder in, a run folder out.

The same run as `train_run` (the same run folder, resume, phases and summary,
through `tftransfer.run.execute`); only the task differs. `DistillTask`
computes the teacher's logits for each image once (cached like backbone
features), feeds them beside each example, and trains a `Distiller` around the
student's head (head phase, on cached features) or its classifier (fine-tuning,
on cached activations or images).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tftransfer.backbones import get_backbone_spec
from tftransfer.cache import open_cache
from tftransfer.data import RESIZE_METHOD
from tftransfer.distill import TEACHER_LOGITS, Distiller
from tftransfer.engine import Engine
from tftransfer.examples import SPLITS
from tftransfer.run import Declaration, RunResult, execute, say
from tftransfer.settings import DistillConfig
from tftransfer.teacher import Teacher, check_teacher, load_teacher


class DistillTask:
    """Trains a student to match a teacher's softened outputs and the labels.

    Args:
        teacher: A loaded `Teacher`.
        temperature: Softens both distributions.
        student_loss_weight: Weight of the hard-label loss.
    """

    def __init__(self, teacher: Teacher, temperature: float,
                 student_loss_weight: float):
        self.teacher = teacher
        self.options = dict(temperature=temperature,
                            student_loss_weight=student_loss_weight)
        self.logits = {}
        self.accuracy = None

    def prepare(self, engine: Engine) -> None:
        """Computes (or reads from the cache) the teacher's logits for each image."""
        teacher = self.teacher
        cache = engine.cache_dir and open_cache(engine.cache_dir, {
            "network": "teacher logits", "weights": teacher.fingerprint,
            "image_size": teacher.image_size, "preprocessing": "teacher's own",
            "resize": RESIZE_METHOD, "dtype_policy": keras.config.dtype_policy().name,
            "versions": [tf.__version__, keras.__version__],
        }, verbose=engine.schedule.verbose != 0)
        engine.say("Computing the teacher's logits ...")
        network = teacher.model if teacher.model is not None else teacher.forward
        options = {"image_size": teacher.image_size}
        if teacher.image_size is None:
            # A SavedModel teacher decodes the files itself, in its own graph.
            options["jit_compile"] = False
        with engine.timings.stage("teacher"):
            for split in SPLITS:
                self.logits[split] = engine.outputs(network, cache, split, "teacher",
                                                    **options)
        labels = engine.examples.labels("validation")
        correct, seen = engine.workers.total([
            np.sum(self.logits["validation"].argmax(-1) == labels), len(labels)])
        self.accuracy = float(correct / max(seen, 1.0))
        counts = engine.stats["teacher"]
        engine.say(f"Teacher: val_accuracy {self.accuracy:.4f}; logits "
                   f"{counts['hits']} from cache, {counts['computed']} computed")

    def extras(self, split: str) -> dict:
        return {TEACHER_LOGITS: self.logits[split]}

    def training_model(self, network: keras.Model, phase: str, optimizer,
                       jit_compile: bool) -> keras.Model:
        # Every batch carries the teacher's logits: the Distiller needs no teacher.
        distiller = Distiller(None, network, **self.options, name=f"{phase}_distiller")
        distiller.compile(optimizer=optimizer, jit_compile=jit_compile)
        return distiller

    def summary(self, engine: Engine) -> dict:
        return {
            "teacher": self.teacher.path,
            "teacher_val_accuracy": self.accuracy,
            **self.options,
            "teacher_logits": engine.stats.get("teacher"),
        }


def distill_run(config: DistillConfig) -> RunResult:
    """Distils a teacher into a student on an image folder; writes a run folder.

    The teacher's logits for each image are computed once and cached, and so
    are the student's backbone features (the same entries `train` uses) and,
    when fine-tuning, the activations below its unfrozen top: distilling costs
    one forward pass of each network. A killed distillation resumes from its
    last finished epoch, as a `train` run does.

    Args:
        config: A `DistillConfig`.

    Returns:
        A `RunResult`; its summary is `train_run`'s plus `teacher`,
        `teacher_val_accuracy`, `temperature`, `student_loss_weight` and
        `teacher_logits` (cache counts).

    Raises:
        DataError: unusable data, or a teacher with other classes.
        TransferError: a student image size the teacher does not take.
        RunFolderError: `config.output` holds a finished run, or an
            unfinished one with other settings (a `train` run's among them),
            and `config.overwrite` is False.

    Example:

    A teacher trained for two epochs, distilled into a student of the same
    backbone (both with random weights, to run offline):

    >>> import os, tempfile
    >>> from tftransfer import TrainConfig, train_run
    >>> from tftransfer.demo import write_demo_images
    >>> work = tempfile.mkdtemp()
    >>> data = write_demo_images(os.path.join(work, "data"), 8, image_size=32)
    >>> teacher = train_run(TrainConfig(
    ...     data, output=os.path.join(work, "teacher"), backbone="vgg16",
    ...     weights=None, image_size=32, epochs=2, verbose=0))
    >>> result = distill_run(DistillConfig(
    ...     data, teacher=teacher.path, student="vgg16", weights=None, epochs=2,
    ...     verbose=0, output=os.path.join(work, "student")))
    >>> result.history.history["phase"]
    ['head', 'head']
    >>> sorted(key for key in result.history.history if "loss" in key)
    ['distillation_loss', 'loss', 'student_loss', 'val_distillation_loss', 'val_loss', 'val_student_loss']
    >>> result.summary["temperature"], result.summary["student_loss_weight"]
    (3.0, 0.5)
    >>> result.summary["teacher"] == os.path.join(teacher.path, "model.keras")
    True
    >>> result.model.input_shape, result.model.output_shape
    ((None, 32, 32, 3), (None, 3))
    """
    return execute(config, _declare_distill)


def _declare_distill(config: DistillConfig) -> Declaration:
    teacher = load_teacher(config.teacher, safe_mode=not config.unsafe_deserialization)
    check_teacher(teacher, None, config.image_size)
    image_size = (config.image_size or teacher.image_size
                  or get_backbone_spec(config.student).default_image_size)
    say(config, f"Teacher: {teacher.path}")
    task = DistillTask(teacher, config.temperature, config.student_loss_weight)
    # The same teacher wherever its file is, for resuming and for every worker.
    return Declaration(task, image_size, {"teacher": teacher.fingerprint},
                       lambda folder, report: check_teacher(
                           teacher, folder.class_names, config.image_size))

"""Loading a distillation teacher: a run folder, a `.keras` file or a SavedModel."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple, Optional

import keras
import tensorflow as tf

from tftransfer.errors import DataError, TransferError
from tftransfer.export import read_labels
from tftransfer.run_folder import load_run_model, model_file


class Teacher(NamedTuple):
    """A loaded teacher: see `load_teacher`."""

    forward: Callable  # pixels (raw bytes when image_size is None) -> logits
    model: Optional[keras.Model]
    class_names: Optional[list]
    image_size: Optional[int]
    fingerprint: str
    path: str
    num_classes: Optional[int] = None


def teacher_kind(path: str) -> str:
    """`"keras"` or `"saved_model"`: what `path` holds, checked without loading it.

    Raises:
        TransferError: `path` is neither a run folder, a `.keras` file nor a
            SavedModel folder.
    """
    path = os.path.abspath(os.fspath(path))
    if model_file(path) is not None:
        return "keras"
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return "saved_model"
    raise TransferError(
        f"No teacher model at {path}. Expected a tftransfer run folder, a .keras "
        "file or a tftransfer SavedModel folder."
    )


def load_teacher(path: str, safe_mode: bool = True) -> Teacher:
    """Loads a teacher from a run folder, a `.keras` file or a SavedModel.

    A run folder or `.keras` file gives a Keras model taking pixels 0..255 and
    returning logits. A tftransfer SavedModel is called through its raw-bytes
    signature, so it decodes images exactly as it does when serving; its logits
    are the log of its probabilities (equal to the logits up to a constant, which
    softmax ignores). A run folder whose `.keras` model cannot load in Keras'
    safe mode (a hub backbone) uses its SavedModel, which serves the same model.

    Args:
        path: The teacher: a run folder, a `.keras` file or a tftransfer
            SavedModel folder.
        safe_mode: Keras' safe mode for a `.keras` file. Defaults to `True`.

    Returns:
        A `Teacher`: `forward` (pixels, or raw image bytes for a SavedModel, to
        logits), `model` (`None` for a SavedModel), `class_names` (from a
        `labels.txt` beside the model, else `None`), `image_size` (`None` for a
        SavedModel), `fingerprint` (of its weights), `path` and `num_classes`.

    Raises:
        TransferError: `path` is none of these, or a `.keras` file needs
            `safe_mode=False`.

    Example:

    >>> import tempfile
    >>> import numpy as np
    >>> import tftransfer
    >>> backbone = tftransfer.load_backbone("vgg16", weights=None, image_size=32)
    >>> model = tftransfer.build_classifier(backbone, num_classes=3)
    >>> path = os.path.join(tempfile.mkdtemp(), "teacher.keras")
    >>> model.save(path)
    >>> teacher = load_teacher(path)
    >>> teacher.image_size, teacher.num_classes, teacher.class_names
    (32, 3, None)
    >>> teacher.forward(np.zeros((2, 32, 32, 3), "float32")).shape
    TensorShape([2, 3])
    >>> load_teacher(tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    tftransfer.errors.TransferError: No teacher model at .... Expected a tftransfer run folder, a .keras file or a tftransfer SavedModel folder.
    """
    kind = teacher_kind(path)
    path = os.path.abspath(os.fspath(path))
    if kind == "saved_model":
        return _saved_model_teacher(path)
    file = model_file(path)
    saved_model = os.path.join(os.path.dirname(file), "saved_model")
    try:
        model = load_run_model(file, safe_mode=safe_mode)
    except TransferError:
        # A hub backbone: a run folder's SavedModel serves the same model
        # without running anything but TensorFlow's own graph.
        if safe_mode and os.path.isdir(saved_model):
            return _saved_model_teacher(saved_model)
        raise
    from tftransfer.cache import weights_fingerprint

    model.trainable = False
    labels = read_labels(os.path.join(os.path.dirname(file), "labels.txt"))
    return Teacher(lambda pixels: model(pixels, training=False), model, labels,
                   int(model.input_shape[1]), weights_fingerprint(model), file,
                   int(model.output_shape[-1]))


def _saved_model_teacher(path: str) -> Teacher:
    from tftransfer.cache import weights_fingerprint

    loaded = tf.saved_model.load(path)
    signature = loaded.signatures.get("serving_default")
    if signature is None or "probabilities" not in signature.structured_outputs:
        raise TransferError(
            f"The SavedModel {path} is not a tftransfer export: it has no "
            "serving_default signature returning 'probabilities'. Give a run "
            "folder, a .keras file or a tftransfer SavedModel."
        )

    def forward(image_bytes):
        probabilities = signature(image_bytes=image_bytes)["probabilities"]
        return tf.math.log(tf.maximum(probabilities, 1e-12))

    return Teacher(forward, None, read_labels(os.path.join(path, "assets", "labels.txt")),
                   None, weights_fingerprint(loaded.variables), path,
                   signature.structured_outputs["probabilities"].shape[-1])


def check_teacher(teacher: Teacher, class_names: Optional[list],
                  image_size: Optional[int]) -> None:
    """Refuses a teacher whose classes or input size do not fit the data.

    Raises:
        DataError: other classes, or another number of outputs.
        TransferError: `image_size` differs from the teacher's input size.
    """
    if class_names is None:  # The data is not scanned yet: the size alone.
        pass
    elif teacher.class_names is not None and teacher.class_names != class_names:
        raise DataError(
            f"The teacher's classes {teacher.class_names} differ from the data's "
            f"class folders {class_names}. Distil on the data the teacher was "
            "trained for, with the same class folders."
        )
    elif teacher.num_classes is not None and teacher.num_classes != len(class_names):
        raise DataError(
            f"The teacher has {teacher.num_classes} outputs but the data has "
            f"{len(class_names)} classes ({class_names})."
        )
    if image_size and teacher.image_size and image_size != teacher.image_size:
        raise TransferError(
            f"The teacher takes {teacher.image_size} px images, the student was "
            f"asked for {image_size} px. Leave out --image-size to use the "
            "teacher's size."
        )

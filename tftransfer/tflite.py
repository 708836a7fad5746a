"""LiteRT (TFLite) files for phones and edge devices: conversion and quantization.

A file written here is self-contained for an app: it takes pixels in 0..255 at
the model's size (uint8 for `int8`, float32 otherwise), holds the model's
preprocessing, returns softmax probabilities, and uses builtin LiteRT ops only
(no Select TF / Flex ops, which the standard interpreter refuses at load time).
Its class names travel inside it, as a `labels` entry of the flatbuffer's
metadata, and beside it, in `labels.txt`.

The conversion is TensorFlow's `tf.lite.TFLiteConverter`, the converter LiteRT
documents for TensorFlow models; checking a file against its model is in
`tftransfer.tflite_check`, running it in `tftransfer.litert`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tftransfer.errors import SettingError, TransferError, check_choice
from tftransfer.export import check_destination, labels_text, write_labels
from tftransfer.files import write_atomically
from tftransfer.settings import QUANTIZATIONS

LABELS_METADATA = "labels"


class UnsupportedOpsError(TransferError, ValueError):
    """The model needs ops that LiteRT has no builtin kernel for."""


def input_dtype(quantize: str) -> str:
    """The dtype of a file's pixels: `uint8` for `int8`, else `float32`."""
    return "uint8" if quantize == "int8" else "float32"


def tflite_bytes(
    model: keras.Model,
    quantize: str = "none",
    representative_data: Optional[Iterable] = None,
    class_names: Optional[Sequence[str]] = None,
) -> bytes:
    """Converts a classifier to the bytes of a LiteRT file (see `export_tflite`).

    Args:
        model: A classifier taking square images of pixels in 0..255 and
            returning logits (as `build_classifier` makes).
        quantize: One of `QUANTIZATIONS`: `"none"` (float32), `"float16"`
            (float16 weights), `"dynamic"` (int8 weights, float activations)
            or `"int8"` (full-integer: int8 weights and activations, uint8
            pixels in). Defaults to `"none"`.
        representative_data: For `"int8"` only, and required then: pixel
            batches `(batch, size, size, 3)` in 0..255 to calibrate the
            activations' ranges on (arrays, tensors, or a `tf.data.Dataset`
            yielding them or `(pixels, labels)` pairs). Use images decoded as
            in training (`tftransfer.tflite_check.calibration_dataset`).
        class_names: Class names, in label order, to hold in the file's
            metadata. Defaults to `None` (none held).

    Returns:
        The file's bytes.

    Raises:
        SettingError: for an unknown `quantize`, or `"int8"` without
            `representative_data`.
        UnsupportedOpsError: if the model needs ops without a builtin kernel;
            the message names them.
    """
    check_choice("quantize", quantize, QUANTIZATIONS)
    if quantize == "int8" and representative_data is None:
        raise SettingError(
            "`quantize='int8'` needs `representative_data`: pixel batches to "
            "calibrate on (about 200 training images; see "
            "tftransfer.tflite_check.calibration_dataset)."
        )
    if class_names is not None and len(class_names) != model.output_shape[-1]:
        raise ValueError(
            f"`class_names` must name each of the model's {model.output_shape[-1]} "
            f"outputs. Received: {len(class_names)} names"
        )
    with tempfile.TemporaryDirectory(prefix="tftransfer-tflite-") as saved_model:
        _save_serving_function(model, saved_model, input_dtype(quantize))
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        # Builtin ops only: Keras' own `model.export(format="litert")` also
        # allows Select TF ops, which make files the standard interpreter
        # refuses at load time.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.representative_dataset = _calibration_samples(
                representative_data)
        try:
            contents = converter.convert()
        except Exception as error:  # The converter's own ConverterError.
            ops = unsupported_ops(str(error))
            if not ops:
                raise
            raise UnsupportedOpsError(
                f"The model uses TensorFlow ops that LiteRT has no builtin kernel "
                f"for: {', '.join(ops)}. Replace the layers that use them (custom or "
                "Lambda layers, usually) with standard Keras layers; tftransfer "
                "does not write files that need Select TF (Flex) ops, which the "
                "standard interpreter cannot load."
            ) from None
    if class_names is not None:
        contents = with_labels(contents, class_names)
    return contents


def export_tflite(
    model: keras.Model,
    path: str,
    quantize: str = "none",
    representative_data: Optional[Iterable] = None,
    class_names: Optional[Sequence[str]] = None,
    overwrite: bool = False,
) -> str:
    """Writes a LiteRT (TFLite) file of a classifier, for phones and edge devices.

    The file takes a batch of pixels in 0..255 at the model's size, `float32`
    (uint8 for `quantize="int8"`), as input `pixels`; it holds the model's
    preprocessing and returns softmax probabilities (float32). Its ops are
    builtin LiteRT ops only. It is written beside `path` and renamed into
    place. Nothing checks here that it still answers like the model: see
    `tftransfer.tflite_check.check_tflite` (or `tftransfer export-tflite`,
    which refuses a file that loses accuracy).

    Args:
        model: A classifier taking square images of pixels in 0..255 and
            returning logits (as `build_classifier` makes).
        path: Destination `.tflite` file.
        quantize: `"none"`, `"float16"`, `"dynamic"` or `"int8"` (see
            `tflite_bytes`). Defaults to `"none"`.
        representative_data: Calibration pixel batches, for `"int8"` (see
            `tflite_bytes`). Defaults to `None`.
        class_names: Class names in label order: held in the file's metadata
            and written to `labels.txt` beside it. Defaults to `None`.
        overwrite: Replace an existing file. Defaults to `False`.

    Returns:
        `path`, made absolute.

    Raises:
        RunFolderError: if `path` exists and `overwrite` is `False`.
        SettingError: for an unknown `quantize`, or `"int8"` without
            `representative_data`.
        UnsupportedOpsError: if the model needs ops without a builtin kernel.

    Example:

    >>> import os, tempfile, keras, tftransfer
    >>> from tftransfer.tflite import read_labels
    >>> model = keras.Sequential([keras.Input((32, 32, 3)),
    ...                           keras.layers.GlobalAveragePooling2D(),
    ...                           keras.layers.Dense(3)])
    >>> path = tftransfer.export_tflite(
    ...     model, os.path.join(tempfile.mkdtemp(), "model.tflite"),
    ...     quantize="dynamic", class_names=["desert", "forest", "ocean"])
    >>> with open(path, "rb") as file:
    ...     file.read(8)[4:]  # The TFLite file identifier.
    b'TFL3'
    >>> read_labels(path)
    ['desert', 'forest', 'ocean']
    >>> sorted(os.listdir(os.path.dirname(path)))
    ['labels.txt', 'model.tflite']
    """
    path = os.path.abspath(os.fspath(path))
    check_destination(path, overwrite)
    contents = tflite_bytes(model, quantize, representative_data, class_names)
    write_tflite(path, contents, class_names)
    return path


def write_tflite(path: str, contents: bytes, class_names=None) -> None:
    """Puts `contents` at `path` atomically, and `labels.txt` beside it."""
    write_atomically(path, lambda stream: stream.write(contents))
    if class_names is not None:
        write_labels(os.path.join(os.path.dirname(path), "labels.txt"), class_names)


def _save_serving_function(model: keras.Model, directory: str, dtype: str) -> None:
    """Saves pixels (`dtype`) -> probabilities as a SavedModel to convert."""
    size = model.input_shape[1:3]
    spec = tf.TensorSpec([None, *size, 3], dtype, name="pixels")

    @tf.function(input_signature=[spec], autograph=False)
    def serve(pixels):
        logits = model(tf.cast(pixels, tf.float32), training=False)
        return {"probabilities": tf.nn.softmax(tf.cast(logits, tf.float32))}

    function = serve.get_concrete_function()
    root = tf.__internal__.tracking.AutoTrackable()
    # The tf.Variables the function captures, not the Keras wrappers of
    # `model.variables`: saved that way, the converter cannot tell that they
    # are read-only, and leaves every weight as a variable instead of folding
    # it into the graph (what keras.export.ExportArchive also does).
    root.variables = list(function.variables)
    # The concrete function, not `serve`: save would trace a `tf.function`
    # (and the model) again in its own context (see `export.py`).
    root.serve = function
    tf.saved_model.save(root, directory, signatures={"serving_default": function})


def _calibration_samples(representative_data):
    """The converter's `representative_dataset`: one image per sample."""
    def samples():
        for batch in representative_data:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            for image in np.asarray(batch, dtype="float32"):
                # As the file will see them: whole pixel values in 0..255.
                yield [np.clip(np.round(image), 0, 255).astype("uint8")[None]]

    return samples


def unsupported_ops(message: str) -> list:
    """The TensorFlow op names a converter error says have no builtin kernel."""
    names = set(re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op",
                           message))
    for listed in re.findall(r"(?:Custom|Flex) ops: ([^\n]+)", message):
        names.update(name.strip() for name in listed.split(",") if name.strip())
    return sorted(names)


def with_labels(contents: bytes, class_names: Sequence[str]) -> bytes:
    """The file `contents` with `class_names` in its metadata (`labels` entry).

    The TFLite schema's metadata is a list of named buffers that interpreters
    ignore; TFLite Support's metadata writer, which filled it for Android's
    Task Library, is no longer maintained, so this writes a plain entry with
    LiteRT's own flatbuffer tools.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(contents))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(labels_text(class_names).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = LABELS_METADATA
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or [])
                      if m.name not in (LABELS_METADATA, LABELS_METADATA.encode())]
    model.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _model_root(path_or_contents):
    from ai_edge_litert import schema_py_generated as schema

    if isinstance(path_or_contents, (bytes, bytearray)):
        contents = bytes(path_or_contents)
    else:
        with open(path_or_contents, "rb") as file:
            contents = file.read()
    return schema.Model.GetRootAs(contents, 0), schema


def read_labels(path_or_contents) -> Optional[list]:
    """The class names held in a LiteRT file's metadata, or `None`.

    Args:
        path_or_contents: A `.tflite` file's path, or its bytes.

    Returns:
        The class names in label order, or `None` if the file holds none.
    """
    root, _ = _model_root(path_or_contents)
    for index in range(root.MetadataLength()):
        entry = root.Metadata(index)
        if entry.Name() == LABELS_METADATA.encode():
            text = root.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode()
            return text.split("\n")[:-1]
    return None


def read_ops(path_or_contents) -> list:
    """The names of the ops a LiteRT file uses (custom ops by their own name)."""
    root, schema = _model_root(path_or_contents)
    names = {value: name for name, value in vars(schema.BuiltinOperator).items()
             if not name.startswith("_")}
    ops = set()
    for index in range(root.OperatorCodesLength()):
        code = root.OperatorCodes(index)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            ops.add(code.CustomCode().decode())
        else:
            ops.add(names.get(builtin, str(builtin)))
    return sorted(ops)

"""Export for serving: a SavedModel that takes raw image bytes.

The SavedModel is written to a temporary folder beside the destination and
renamed into place, so an interrupted export never leaves a half-written model
where a server would load it, and an existing model is only replaced by a
complete one. LiteRT (TFLite) files are in `tftransfer.tflite`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import keras
import tensorflow as tf

from tftransfer.data import RESIZE_METHOD, decode_image
from tftransfer.errors import RunFolderError
from tftransfer.files import replace_atomically, write_atomically
from tftransfer.image_headers import check_declared_pixels
from tftransfer.packing import PackedWeights, tf_variable
from tftransfer.settings import MAX_SERVING_PIXELS


def _serving_outputs(logits: tf.Tensor, class_names: tf.Tensor):
    probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
    class_ids = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    return {
        "probabilities": probabilities,
        "class_ids": class_ids,
        "class_names": tf.gather(class_names, class_ids),
    }


def export_saved_model(
    model: keras.Model,
    export_dir: str,
    class_names: Sequence[str],
    overwrite: bool = False,
    max_pixels: int = MAX_SERVING_PIXELS,
) -> str:
    """Writes a SavedModel that serves raw image bytes and pixel arrays.

    Signatures (both return `probabilities` float32 `[batch, classes]`,
    `class_ids` int32 `[batch]` and `class_names` string `[batch]`):

    - `serving_default(image_bytes)`: string `[batch]` of encoded JPEG, PNG, GIF,
      BMP or WebP images, decoded and resized inside exactly as in training.
      An image whose header declares more than `max_pixels` pixels is refused
      before it is decoded (`InvalidArgumentError`), as are bytes that are no
      image; an empty batch returns empty outputs.
    - `serve_pixels(images)`: float32 `[batch, height, width, 3]` in 0..255, any
      size, resized inside.

    `assets/labels.txt` holds the class names, one per line. The SavedModel loads
    with `tf.saved_model.load` and TensorFlow Serving; tftransfer is not needed.
    It is for serving: its `variables` hold the model's weights packed
    (`tftransfer.packing`), which makes the export about 40% faster, each
    batch normalisation layer as the scale and offset it applies at inference
    (`tftransfer.folding`); `model.keras` is the file to train on from. A
    model whose layers keep variables Keras does not manage (a TF-Hub
    backbone's) is saved with one variable per weight, in `variables`,
    `trainable_variables` and `non_trainable_variables`.

    Args:
        model: A classifier taking square images of pixels in 0..255 and
            returning logits.
        export_dir: Destination folder.
        class_names: Names of the model's classes, in label order.
        overwrite: Replace an existing `export_dir`. Defaults to `False`.
        max_pixels: The most pixels an image sent to `serving_default` may
            declare (`declared_pixels`), so that a decompression bomb (a few
            kilobytes declaring 30000x30000 pixels) cannot take the server's
            memory. Defaults to `MAX_SERVING_PIXELS` (40 million).

    Returns:
        `export_dir`, made absolute.

    Raises:
        FileExistsError: if `export_dir` exists and `overwrite` is `False`.
        ValueError: if `class_names` does not name each of the model's outputs.

    Example:

    >>> import os, tempfile, tensorflow as tf, tftransfer
    >>> backbone = tftransfer.load_backbone("vgg16", weights=None, image_size=32)
    >>> model = tftransfer.build_classifier(backbone, num_classes=3)
    >>> export_dir = tftransfer.export_saved_model(
    ...     model, os.path.join(tempfile.mkdtemp(), "saved_model"),
    ...     ["desert", "forest", "ocean"])
    >>> sorted(os.listdir(export_dir))
    ['assets', 'fingerprint.pb', 'saved_model.pb', 'variables']
    >>> served = tf.saved_model.load(export_dir)
    >>> sorted(served.signatures)
    ['serve_pixels', 'serving_default']
    >>> image = tf.io.encode_png(tf.zeros([48, 64, 3], tf.uint8))
    >>> outputs = served.signatures["serving_default"](
    ...     image_bytes=tf.stack([image, image]))
    >>> {name: tuple(value.shape) for name, value in sorted(outputs.items())}
    {'class_ids': (2,), 'class_names': (2,), 'probabilities': (2, 3)}
    """
    export_dir = os.path.abspath(os.fspath(export_dir))
    check_destination(export_dir, overwrite)
    image_size = model.input_shape[1]
    if len(class_names) != model.output_shape[-1]:
        raise ValueError(
            f"`class_names` must name each of the model's {model.output_shape[-1]} "
            f"outputs. Received: {len(class_names)} names"
        )
    names = tf.constant(list(class_names))
    pixel_spec = tf.TensorSpec([image_size, image_size, 3], tf.float32)

    # tf.saved_model.save of our own trackable rather than
    # keras.export.ExportArchive: the archive walks every trackable of the model
    # looking for resources and traces each endpoint on its own, with autograph;
    # on MobileNetV2 that took 13 s against 5 s here, for the same SavedModel.
    # Both signatures call `serve`, so the model is traced once.
    def signatures(forward):
        @tf.function(input_signature=[tf.TensorSpec([None, *pixel_spec.shape])],
                     autograph=False)
        def serve(pixels):
            # An empty batch runs the model on one blank image, sliced away:
            # with oneDNN on AVX-512 CPUs a Conv2D on zero images returns its
            # input unchanged, and the next convolution fails on its depth.
            count = tf.shape(pixels)[0]
            pixels = tf.cond(count > 0, lambda: pixels,
                             lambda: tf.zeros([1, *pixel_spec.shape]))
            outputs = _serving_outputs(forward(pixels), names)
            return {name: value[:count] for name, value in outputs.items()}

        @tf.function(
            input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
            autograph=False,
        )
        def serve_bytes(image_bytes):
            def decode(contents):
                with tf.control_dependencies(
                        [check_declared_pixels(contents, max_pixels)]):
                    return decode_image(contents, image_size)

            pixels = tf.map_fn(
                decode,
                image_bytes,
                fn_output_signature=pixel_spec,
            )
            return serve(pixels)

        @tf.function(
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32,
                                           name="images")],
            autograph=False,
        )
        def serve_pixels(images):
            return serve(tf.image.resize(images, [image_size, image_size],
                                         method=RESIZE_METHOD))

        return serve, serve_bytes, serve_pixels

    # tf.train.Checkpoint takes any attribute, so the loaded object keeps the
    # `variables` lists (a tf.Module's are read-only properties).
    module = tf.train.Checkpoint()
    try:
        packed = PackedWeights(model)
        serve, serve_bytes, serve_pixels = signatures(packed)
        covered = packed.covers(serve.get_concrete_function())
    except Exception:  # A model that cannot run on given values: unpacked.
        covered = False
    if covered:
        module.variables = packed.variables
    else:  # Layers reading variables of their own (a TF-Hub module's).
        serve, serve_bytes, serve_pixels = signatures(
            lambda pixels: model(pixels, training=False))
        for name in ("variables", "trainable_variables", "non_trainable_variables"):
            setattr(module, name, [tf_variable(v) for v in getattr(model, name)])
    # Concrete functions, traced here: given the `tf.function`s, save would
    # trace them again (and the model within), since a trace inside its save
    # context has a cache key of its own (TensorFlow's `variable_policy`).
    module.serving_default = serve_bytes.get_concrete_function()
    module.serve_pixels = serve_pixels.get_concrete_function()

    def write(tmp_dir):
        tf.saved_model.save(
            module,
            tmp_dir,
            signatures={"serving_default": module.serving_default,
                        "serve_pixels": module.serve_pixels},
        )
        os.makedirs(os.path.join(tmp_dir, "assets"), exist_ok=True)
        write_labels(os.path.join(tmp_dir, "assets", "labels.txt"), class_names)

    replace_atomically(export_dir, write)
    return export_dir


def labels_text(class_names: Sequence[str]) -> str:
    """Class names one per line, in label order, as `labels.txt` holds them."""
    return "".join(f"{name}\n" for name in class_names)


def write_labels(path: str, class_names: Sequence[str]) -> None:
    """Writes class names one per line, in label order (`labels.txt`)."""
    contents = labels_text(class_names)
    write_atomically(path, lambda stream: stream.write(contents), text=True)


def read_labels(path: str) -> Optional[list]:
    """The class names in a `labels.txt`, exactly as written, or `None` when
    there is none.

    Lines end at `\n` alone (a name may hold any other character the scan
    accepts, which refuses line breaks), and the file is UTF-8.
    """
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", newline="") as handle:
        names = handle.read().split("\n")
    while names and not names[-1]:
        names.pop()
    return names


def check_destination(path: str, overwrite: bool) -> None:
    """Refuses to replace an existing export unless `overwrite`."""
    if os.path.exists(path) and not overwrite:
        raise RunFolderError(
            f"{path} exists already. Choose another destination or pass "
            "overwrite=True (--overwrite) to replace it."
        )

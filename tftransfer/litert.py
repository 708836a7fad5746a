"""Running a LiteRT (TFLite) file as a phone would: LiteRT's own interpreter.

The interpreter is the maintained LiteRT package (`ai-edge-litert`), not
`tf.lite.Interpreter`, which is deprecated and scheduled to leave TensorFlow.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Optional

import numpy as np

from tftransfer.errors import DataError, TransferError


class MissingLiteRTError(TransferError, ImportError):
    """The LiteRT interpreter package (`ai-edge-litert`) is not installed."""


def interpreter_class():
    """LiteRT's `Interpreter` class, or a clear error saying how to install it."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:
        raise MissingLiteRTError(
            "Running a .tflite file needs LiteRT's interpreter: "
            "pip install ai-edge-litert (it is a dependency of tftransfer; "
            f"reinstalling tftransfer installs it). ({error})"
        ) from None
    return Interpreter


class LiteRTModel:
    """A `.tflite` classifier (from `export_tflite`) in LiteRT's interpreter.

    It offers what `ServedModel` offers for a SavedModel, so `evaluate_folder`
    and `predict_paths` take either: files are decoded and resized as in
    training (`decode_image`), then the file computes the probabilities.

    Args:
        path: A `.tflite` file written by `export_tflite`.
        num_threads: Threads of the interpreter. Defaults to `None` (all the
            machine's cores).

    Attributes:
        path: The file.
        class_names: From the file's metadata, else from `labels.txt` beside
            it, else `"0"`, `"1"`, ...
        image_size: Side of the square images the file takes.
        input_dtype: `numpy.uint8` (an `int8` file) or `numpy.float32`.
        num_threads: Threads of the interpreter.

    Raises:
        DataError: if `path` is not a LiteRT classifier file.
        MissingLiteRTError: if `ai-edge-litert` is not installed.

    Example:

    >>> import os, tempfile, keras, numpy as np, tftransfer
    >>> model = keras.Sequential([keras.Input((32, 32, 3)),
    ...                           keras.layers.GlobalAveragePooling2D(),
    ...                           keras.layers.Dense(3)])
    >>> path = tftransfer.export_tflite(
    ...     model, os.path.join(tempfile.mkdtemp(), "model.tflite"),
    ...     class_names=["desert", "forest", "ocean"])
    >>> lite = tftransfer.LiteRTModel(path)
    >>> lite.class_names, lite.image_size
    (['desert', 'forest', 'ocean'], 32)
    >>> pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3))
    >>> expected = keras.ops.softmax(model(pixels)).numpy()
    >>> bool(np.allclose(lite.predict(pixels), expected, atol=1e-5))
    True
    """

    def __init__(self, path: str, num_threads: Optional[int] = None):
        from tftransfer.tflite import read_labels

        self.path = os.path.abspath(os.fspath(path))
        self.num_threads = num_threads or os.cpu_count() or 1
        if not os.path.isfile(self.path):
            raise DataError(f"No LiteRT file at {path!r}.")
        Interpreter = interpreter_class()
        try:
            self._interpreter = Interpreter(model_path=self.path,
                                            num_threads=self.num_threads)
            labels = read_labels(self.path)
        except (ValueError, RuntimeError) as error:
            raise DataError(f"{path!r} is not a LiteRT (TFLite) file that can be "
                            f"loaded: {error}") from None
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0]["shape"]) != 4:
            raise DataError(
                f"{path!r} is not an image classifier written by export_tflite: "
                "expected one input (batch, size, size, 3) and one output.")
        self._input = inputs[0]
        self._output = outputs[0]
        self.image_size = int(self._input["shape"][1])
        self.input_dtype = self._input["dtype"]
        self._batch = int(self._input["shape"][0])
        num_classes = int(self._output["shape"][-1])
        self.class_names = labels or _labels_beside(self.path, num_classes)
        self._interpreter.allocate_tensors()

    def predict(self, pixels, batch_size: int = 32) -> np.ndarray:
        """Returns class probabilities of images of the file's size.

        Args:
            pixels: An array `(n, size, size, 3)` of pixels in 0..255.
            batch_size: Images per call of the interpreter. Defaults to `32`.

        Returns:
            A float32 array `(n, num_classes)`.
        """
        pixels = np.asarray(pixels)
        if self.input_dtype == np.uint8:
            pixels = np.clip(np.round(pixels), 0, 255)
        pixels = pixels.astype(self.input_dtype)
        outputs = [self._call(pixels[start:start + batch_size])
                   for start in range(0, len(pixels), batch_size)]
        if not outputs:
            return np.zeros([0, len(self.class_names)], "float32")
        return np.concatenate(outputs).astype("float32")

    def _call(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape[0] != self._batch:
            self._interpreter.resize_tensor_input(self._input["index"],
                                                  list(batch.shape))
            self._interpreter.allocate_tensors()
            self._batch = batch.shape[0]
        self._interpreter.set_tensor(self._input["index"], batch)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output["index"]).copy()

    def predict_files(self, paths: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Returns class probabilities of image files, decoded as in training.

        Args:
            paths: Image files.
            batch_size: Images per call of the interpreter. Defaults to `32`.

        Returns:
            A float32 array `(len(paths), num_classes)`.
        """
        from tftransfer.data import make_dataset

        images = make_dataset(list(paths), np.zeros(len(paths), "int32"),
                              self.image_size, batch_size)
        outputs = [self.predict(pixels.numpy(), batch_size) for pixels, _ in images]
        if not outputs:
            return np.zeros([0, len(self.class_names)], "float32")
        return np.concatenate(outputs)

    def latency_ms(self, image: np.ndarray, num_threads: int = 1,
                   repeats: int = 30) -> float:
        """Median milliseconds of one image through a fresh interpreter.

        Args:
            image: One image `(size, size, 3)`, pixels in 0..255.
            num_threads: Threads of the interpreter. Defaults to `1`.
            repeats: Timed calls, after 3 untimed ones. Defaults to `30`.

        Returns:
            The median time of a call, in milliseconds.
        """
        timed = LiteRTModel(self.path, num_threads=num_threads)
        batch = np.asarray(image)[None]
        for _ in range(3):
            timed.predict(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            timed.predict(batch)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1000)


def _labels_beside(path: str, num_classes: int) -> list:
    from tftransfer.export import read_labels

    names = read_labels(os.path.join(os.path.dirname(path), "labels.txt"))
    if names is not None and len(names) == num_classes:
        return names
    return [str(index) for index in range(num_classes)]

"""Mixed precision: the Keras dtype policy a run trains under."""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from tftransfer.errors import check_choice
from tftransfer.settings import PRECISIONS


def dtype_policy(mixed_precision: str) -> str:
    """The Keras dtype policy for a `mixed_precision` setting.

    Args:
        mixed_precision: `"auto"`, `"off"`, `"float16"` or `"bfloat16"`.
            `"auto"` picks float16 on GPUs of compute capability 7.0 or more
            (Tensor Cores) and float32 elsewhere: CPUs emulate float16 slowly.

    Returns:
        `"float32"`, `"mixed_float16"` or `"mixed_bfloat16"`.

    Example:

    >>> dtype_policy("bfloat16")
    'mixed_bfloat16'
    """
    check_choice("mixed_precision", mixed_precision, PRECISIONS)
    if mixed_precision == "auto":
        capable = [
            gpu for gpu in tf.config.list_physical_devices("GPU")
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
        mixed_precision: As for `dtype_policy`.

    Yields:
        The policy's name, e.g. `"mixed_float16"`.

    Example:

    >>> import keras
    >>> with dtype_policy_scope("float16") as policy:
    ...     print(policy, keras.config.dtype_policy().name)
    mixed_float16 mixed_float16
    >>> keras.config.dtype_policy().name
    'float32'
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype_policy(mixed_precision))
    try:
        yield keras.config.dtype_policy().name
    finally:
        keras.config.set_dtype_policy(previous)

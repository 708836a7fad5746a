"""Batch normalisation folded into one multiply and add, for serving traces.

At inference a `BatchNormalization` layer computes
`(x - mean) / sqrt(variance + epsilon) * gamma + beta`: Keras' TensorFlow
backend traces it as about eleven graph ops (four reshapes of its weights,
then `tf.nn.batch_normalization`'s rsqrt, multiplies and adds), where
`x * scale + offset` with `scale` and `offset` computed once from the weights
is two. In a trace of the fused MobileNet 0.75 + MobileNetV2 0.35 classifier
the 79 such layers took 1.5 s of the model's 2.9 s (cProfile). Keras has no
inference-only form of the layer, and TensorFlow's graph optimiser cannot fold
ops that read variables; hence this module.

`run_folded` runs a model through its functional graphs (Keras'
`Function._run_through_graph`, as `Functional.call` does) and computes each
batch normalisation layer reached that way from given `scale` and `offset`;
every other layer is called as usual, through its `__call__` (autocast and
all). A layer nested inside a subclassed layer is not reached: it computes as
usual.
"""

from __future__ import annotations

from typing import Optional

import keras
import numpy as np
import tensorflow as tf


def _graph(layer) -> Optional[keras.Model]:
    """The functional graph `layer` runs, or `None` (a plain layer, or a
    model subclass whose own `call` might do more than run its graph)."""
    from keras.src.models.functional import Functional

    if isinstance(layer, keras.Sequential):
        if type(layer).call is not keras.Sequential.call:
            return None
        layer = getattr(layer, "_functional", None)
    if (isinstance(layer, Functional) and type(layer).call is Functional.call
            and hasattr(layer, "_run_through_graph")):
        return layer
    return None


def _is_plain_batch_norm(layer) -> bool:
    """A `BatchNormalization` computing what Keras' does: a subclass might
    add to it."""
    return (isinstance(layer, keras.layers.BatchNormalization)
            and type(layer).call is keras.layers.BatchNormalization.call)


def foldable_batch_norms(model: keras.Model) -> list:
    """The built `BatchNormalization` layers `run_folded` computes itself:
    those in `model`'s functional graph or a nested one's, each once."""
    found, seen, pending = [], set(), [model]
    while pending:
        graph = _graph(pending.pop())
        if graph is None or id(graph) in seen:
            continue
        seen.add(id(graph))
        for operation in graph.operations:
            if _is_plain_batch_norm(operation):
                if operation.built and id(operation) not in seen:
                    seen.add(id(operation))
                    found.append(operation)
            else:
                pending.append(operation)
    return found


def folded_values(layer: keras.layers.BatchNormalization) -> tuple:
    """`(scale, offset)`, float32 vectors, with which `x * scale + offset` is
    what the inference-mode `layer` computes of `x`."""

    def value(variable, unused=None):  # `gamma`, `beta`: None when unused.
        if variable is None:
            return unused
        return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)

    mean, variance = value(layer.moving_mean), value(layer.moving_variance)
    gamma, beta = value(layer.gamma, 1.0), value(layer.beta, 0.0)
    scale = gamma / np.sqrt(variance + layer.epsilon)
    return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


def run_folded(model: keras.Model, inputs, folds: dict):
    """`model(inputs, training=False)`, each batch normalisation layer of
    `folds` (`{id(layer): (scale, offset)}`, tensors) computed as
    `x * scale + offset`. `model` must be functional (`foldable_batch_norms`
    found its layers)."""
    from keras.src.models.functional import operation_fn, unpack_singleton

    def run(graph, values):  # What `Functional.call` does, with `wrap`.
        return unpack_singleton(graph._run_through_graph(
            graph._standardize_inputs(values), operation_fn=wrap))

    def first(args, kwargs):  # The input, however the node passed it.
        return args[0] if args else kwargs["inputs"]

    def wrap(operation):
        if id(operation) in folds:
            return lambda *args, **kwargs: _affine(
                operation, first(args, kwargs), *folds[id(operation)])
        graph = _graph(operation)
        if graph is not None:
            return lambda *args, **kwargs: run(graph, first(args, kwargs))
        return operation_fn(operation, training=False)

    return run(_graph(model), inputs)


def _affine(layer, x, scale, offset):
    from keras.src.backend import get_keras_mask, set_keras_mask

    axis = layer.axis if layer.axis >= 0 else len(x.shape) + layer.axis
    if axis != len(x.shape) - 1:  # Channels first: broadcast along `axis`.
        shape = [1] * len(x.shape)
        shape[axis] = -1
        scale, offset = tf.reshape(scale, shape), tf.reshape(offset, shape)
    # As Keras' layer: at least float32 within, the layer's dtype out.
    dtype = keras.backend.result_type(x.dtype, "float32")
    y = tf.cast(x, dtype) * tf.cast(scale, dtype) + tf.cast(offset, dtype)
    y = tf.cast(y, layer.compute_dtype)
    mask = get_keras_mask(x)
    if mask is not None:  # Carried on, as the layer's `__call__` would.
        set_keras_mask(y, mask)
    return y

"""A model's small weights packed into one variable, for the SavedModel export.

`tf.saved_model.save` pays for each variable: every traced function captures
it, and the SaverDef (`functional_saver`, which TensorFlow Serving's loader
restores from) gets save and restore ops for each; in a profile of the fused
MobileNet 0.75 + MobileNetV2 0.35 classifier (398 variables, mostly batch
normalisation's four per layer) those were about half of the export. Packed,
the SavedModel holds one variable for all of them, which its serving function
splits back into the weights. The whole export, first in a process: MobileNet
0.75 1.26 s before, 0.75-0.80 s packed; the fusion 2.78 s before, 1.53-1.61 s
packed (AVX-512; both still traced the model twice, since mended in
`export.py`). The served outputs and batch-1 latency are the same (11.4 against
11.5 ms, 14.8 against 13.5 ms).

Keras and TensorFlow have no such option (Keras' `ExportArchive` tracks each
variable too), hence this module. The weights go back into the model through
a `keras.StatelessScope`, Keras' own way of running a model on given values.
"""

from __future__ import annotations

from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tftransfer.folding import foldable_batch_norms, folded_values, run_folded

# Weights with more elements than this keep a variable of their own: packing
# them would gain nothing (one variable's cost is small against its bytes)
# and would copy them, doubling the export's memory for VGG16's dense layers.
PACK_LIMIT = 1 << 20


class PackedWeights:
    """`model`'s floating-point weights of at most `PACK_LIMIT` elements
    in one `tf.Variable` per dtype; calling it runs `model` on those values.

    A batch normalisation layer in the model's functional graphs is packed
    as the scale and offset it multiplies and adds at inference, which the
    call computes it from (`tftransfer.folding`): two values per channel
    instead of four, and two graph ops instead of about eleven.

    Call it only inside a `tf.function` being traced (the split is a graph op).
    `variables` lists what the traced function reads: the packed variables,
    then each weight left unpacked. A model whose layers read variables that
    Keras does not manage (a TF-Hub module's own) reads them outside the
    packing: `covers` tells whether a traced function read nothing else.

    Args:
        model: A built Keras model.

    Example:

    >>> import numpy as np, keras, tensorflow as tf
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
    ...                           keras.layers.BatchNormalization()])
    >>> packed = PackedWeights(model)
    >>> len(model.variables), len(packed.variables)
    (6, 1)
    >>> run = tf.function(packed, input_signature=[tf.TensorSpec([None, 4])])
    >>> x = np.ones((2, 4), "float32")
    >>> bool(np.allclose(run(x), model(x, training=False)))
    True
    >>> packed.covers(run.get_concrete_function())
    True
    """

    def __init__(self, model: keras.Model):
        self.model = model
        # Batch normalisation layers the serving trace computes from a scale
        # and an offset (`tftransfer.folding`): those two are packed in place
        # of the layer's four weights, which the trace does not read.
        self.folded = foldable_batch_norms(model)
        unread = {id(v) for layer in self.folded for v in layer.weights}
        self.weights = [v for v in (list(model.trainable_variables)
                                    + list(model.non_trainable_variables))
                        if id(v) not in unread]
        folds = [value for layer in self.folded for value in folded_values(layer)]
        # What is packed, in order: the weights, then each folded layer's
        # scale and offset (float32 arrays).
        entries = [*self.weights, *folds]
        self.shapes = [tuple(entry.shape) for entry in entries]
        groups = {}
        for index, entry in enumerate(entries):
            dtype = tf.as_dtype(entry.dtype)
            if dtype.is_floating and np.prod(entry.shape) <= PACK_LIMIT:
                groups.setdefault(dtype.name, []).append(index)
        self.groups = groups
        self.packed = {
            dtype: tf.Variable(
                tf.concat([tf.reshape(tf_variable(entries[i]), [-1])
                           for i in indices], axis=0),
                trainable=False, name=f"packed_{dtype}")
            for dtype, indices in groups.items()}
        packed = {i for indices in groups.values() for i in indices}
        self._unpacked_at = [i for i in range(len(entries)) if i not in packed]
        self.unpacked = [tf.Variable(entries[i], trainable=False)
                         if isinstance(entries[i], np.ndarray) else tf_variable(entries[i])
                         for i in self._unpacked_at]

    @property
    def variables(self) -> list:
        """The variables a traced call reads: packed first, then unpacked."""
        return [*self.packed.values(), *self.unpacked]

    def __call__(self, inputs):
        values: list[Optional[tf.Tensor]] = [None] * len(self.shapes)
        for dtype, indices in self.groups.items():
            pieces = tf.split(self.packed[dtype],
                              [int(np.prod(self.shapes[i])) for i in indices])
            for i, piece in zip(indices, pieces):
                # A vector's piece is already its shape (batch normalisation's
                # per layer): one graph op fewer each to trace.
                shape = self.shapes[i]
                values[i] = piece if len(shape) == 1 else tf.reshape(piece, shape)
        for i, variable in zip(self._unpacked_at, self.unpacked):
            values[i] = variable
        count = len(self.weights)
        folds = {id(layer): (values[count + 2 * k], values[count + 2 * k + 1])
                 for k, layer in enumerate(self.folded)}
        with keras.StatelessScope(list(zip(self.weights, values[:count]))):
            if folds:
                return run_folded(self.model, inputs, folds)
            # Through the model's own `__call__` (not `stateless_call`, which
            # calls `call` directly): the top level's autocast and its
            # `training` handling stay as they are.
            return self.model(inputs, training=False)

    def covers(self, function) -> bool:
        """Whether concrete `function` reads no variable but `variables`
        (a distributed variable's components counted as its own)."""
        own = set()
        for variable in self.variables:
            own.add(id(variable))
            own.update(id(part) for part in getattr(variable, "values", ()) or ())
        return all(id(variable) in own for variable in function.variables)


def tf_variable(variable):
    """The `tf.Variable` inside a Keras variable (a `tf.Variable` as is).

    `tf.saved_model.save` given a Keras variable makes a second `tf.Variable`
    for it in the export graph (Keras' `_export_to_saved_model_graph`), while
    the traced functions capture the inner one anyway.
    """
    return getattr(variable, "value", variable) if isinstance(
        variable, keras.Variable) else variable

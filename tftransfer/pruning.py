"""Magnitude pruning for Keras 3: a callback that zeroes the smallest weights.

TensorFlow Model Optimization's `prune_low_magnitude` wraps layers of the
legacy `tf_keras` only and cannot even be imported next to Keras 3
(tensorflow/model-optimization#1119), so pruning is written here on Keras 3's
own hooks, without wrapping or rebuilding any layer:

- Each pruned kernel gets a `PruningMask` as its `variable.constraint`. Keras'
  optimizers apply a variable's constraint after every update
  (`variable.assign(variable.constraint(variable))` in
  `BaseOptimizer.apply`, keras/src/optimizers/base_optimizer.py), so a
  pruned weight is zero again after each step, whichever model trains the
  variable: a training wrapper, or a top sub-model made of the same layers.
- `MagnitudePruning` raises the sparsity of each kernel on its own (layer-wise)
  along the schedule of Zhu & Gupta 2017 ("To prune, or not to prune"),
  zeroing the kernel's smallest magnitudes every `frequency` steps. Its step
  is the optimizer's `iterations`, so a resumed run that restores the
  optimizer's state resumes the schedule too; the masks are rebuilt from the
  weights, where the pruned ones are the zeros.
- At the end of training the masks come off (`strip_pruning`): the layers'
  configs never held them, so the model saves, loads and exports without
  custom objects, its zeros kept.

Zeros alone make a model neither faster nor smaller on disk: its files
compress better (`gzip_size`), and runtimes that skip zeros can use them.
"""

from __future__ import annotations

import gzip
import os
import tarfile
from collections.abc import Callable, Sequence
from typing import Optional, Union

import keras
import tensorflow as tf

# The layers whose kernels are pruned. BatchNormalization's weights and the
# biases are not: they are few, and each one scales or shifts a whole channel.
PRUNABLE_LAYERS = (
    keras.layers.Dense,
    keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
    keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
)
# Keras 3 names a depthwise convolution's kernel `kernel` (Keras 2 named it
# `depthwise_kernel`, as separable convolutions still do).
_KERNEL_ATTRIBUTES = ("kernel", "depthwise_kernel", "pointwise_kernel")


class PruningMask(keras.constraints.Constraint):
    """A constraint that multiplies a kernel by a 0/1 mask.

    Keras' optimizers apply a variable's `constraint` after each update, so
    the masked weights stay zero while the others train. The mask is a
    non-trainable variable of the kernel's shape, owned by no layer (it is
    not saved with the model); `MagnitudePruning` sets it.

    Args:
        shape: The kernel's shape.
        dtype: The kernel's dtype. Defaults to `"float32"`.
        previous: The kernel's constraint before pruning, applied before the
            mask and restored by `strip_pruning`. Defaults to `None`.

    Example:

    >>> import numpy as np
    >>> mask = PruningMask((2, 2))
    >>> _ = mask.mask.assign(np.array([[1.0, 0.0], [0.0, 1.0]]))
    >>> keras.ops.convert_to_numpy(mask(np.full((2, 2), 3.0))).tolist()
    [[3.0, 0.0], [0.0, 3.0]]
    """

    def __init__(self, shape, dtype="float32", previous=None):
        self.mask = keras.Variable(keras.ops.ones(shape, dtype=dtype),
                                   trainable=False, dtype=dtype, name="pruning_mask")
        self.previous = previous

    def __call__(self, w):
        if self.previous is not None:
            w = self.previous(w)
        return keras.ops.multiply(w, keras.ops.cast(self.mask, w.dtype))

    def get_config(self):
        # The mask is state, not configuration; layers never serialize it
        # (their configs hold `kernel_constraint`, not the variable's).
        return {}


def polynomial_sparsity(step: int, final_sparsity: float, begin_step: int,
                        end_step: int, initial_sparsity: float = 0.0,
                        power: int = 3) -> float:
    """The sparsity at `step` of Zhu & Gupta's schedule.

    `s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power`, with `t`
    clamped to `[t0, t1]`: it rises fast at first, while the network has
    redundant weights to lose, and slowly near the end.

    Args:
        step: The training step `t`.
        final_sparsity: `s_f`, the fraction of zeros reached at `end_step`.
        begin_step: `t0`, where pruning begins.
        end_step: `t1`, where it reaches `final_sparsity`.
        initial_sparsity: `s_i`, the sparsity at `begin_step`.
            Defaults to `0.0`.
        power: The exponent. Defaults to `3`.

    Returns:
        The sparsity, a float between `initial_sparsity` and `final_sparsity`.

    Raises:
        ValueError: `end_step` not after `begin_step`.

    Example:

    >>> [round(polynomial_sparsity(t, 0.8, 0, 100), 6) for t in (0, 50, 100, 200)]
    [0.0, 0.7, 0.8, 0.8]
    """
    if end_step <= begin_step:
        raise ValueError(
            "`end_step` must be after `begin_step`. Received: "
            f"begin_step={begin_step}, end_step={end_step}")
    progress = (min(max(step, begin_step), end_step) - begin_step) / (end_step - begin_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1 - progress) ** power


def _walk(layer: keras.Layer, seen: set):
    """`layer` and the layers inside it, depth first, in their order (Keras'
    `_flatten_layers` reverses each level)."""
    if id(layer) in seen:
        return
    seen.add(id(layer))
    yield layer
    for inner in layer._flatten_layers(include_self=False, recursive=False):
        yield from _walk(inner, seen)


def _layer_kernels(model: keras.Layer) -> list:
    """`(layer, kernel)` of every prunable layer inside `model`, nested models
    included, each kernel once."""
    found, seen = [], set()
    for layer in _walk(model, set()):
        if not isinstance(layer, PRUNABLE_LAYERS):
            continue
        for attribute in _KERNEL_ATTRIBUTES:
            # A LoRA-enabled kernel is a tensor (kernel + update), not a variable.
            kernel = getattr(layer, attribute, None)
            if isinstance(kernel, keras.Variable) and id(kernel) not in seen:
                seen.add(id(kernel))
                found.append((layer, kernel))
    return found


def prunable_kernels(model: keras.Layer, skip: tuple = ()) -> list:
    """The kernels that `model` trains, of its Dense and convolution layers.

    Nested models are searched. Kernels of frozen layers (or inside frozen
    models) are left out, as are biases and BatchNormalization's weights.

    Args:
        model: A built Keras model (or layer).
        skip: Layer classes whose kernels are left out too, e.g.
            `(keras.layers.DepthwiseConv2D,)`. Defaults to `()`.

    Returns:
        A list of `keras.Variable`s, in layer order.

    Example:

    >>> model = keras.Sequential([keras.Input((8, 8, 3)),
    ...                           keras.layers.Conv2D(4, 3, name="frozen"),
    ...                           keras.layers.BatchNormalization(),
    ...                           keras.layers.Flatten(),
    ...                           keras.layers.Dense(2, name="head")],
    ...                          name="model")
    >>> model.get_layer("frozen").trainable = False
    >>> [kernel.path for kernel in prunable_kernels(model)]
    ['model/head/kernel']
    """
    trainable = {id(variable) for variable in model.trainable_variables}
    return [kernel for layer, kernel in _layer_kernels(model)
            if id(kernel) in trainable and not isinstance(layer, skip)]


def magnitude_mask(kernel, sparsity: float) -> tf.Tensor:
    """A 0/1 mask zeroing the `round(sparsity * size)` smallest magnitudes.

    Ties are broken by position (a stable sort), so exactly that many entries
    are zero; weights already zero come first, so earlier pruning is kept.

    Args:
        kernel: A variable or tensor.
        sparsity: The fraction of entries to zero, in `[0, 1]`.

    Returns:
        A tensor of `kernel`'s shape and dtype.

    Example:

    >>> magnitude_mask(tf.constant([[0.5, -2.0], [0.1, 0.5]]), 0.5).numpy().tolist()
    [[0.0, 1.0], [0.0, 1.0]]
    """
    kernel = tf.convert_to_tensor(kernel)
    magnitudes = tf.reshape(tf.abs(kernel), [-1])
    size = int(magnitudes.shape[0])
    count = min(size, max(0, round(sparsity * size)))
    smallest = tf.argsort(magnitudes, stable=True)[:count]
    mask = tf.tensor_scatter_nd_update(tf.ones([size], kernel.dtype),
                                       smallest[:, None], tf.zeros([count], kernel.dtype))
    return tf.reshape(mask, tf.shape(kernel))


def check_fraction(name: str, value, low_open: bool) -> float:
    """`value` as a float in (0, 1), or [0, 1) when not `low_open`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    else:
        ok = (0 < value < 1) if low_open else (0 <= value < 1)
    if not ok:
        bounds = "strictly between 0 and 1" if low_open else "in [0, 1)"
        raise ValueError(
            f"`{name}` must be a number {bounds} (the fraction of each pruned "
            f"kernel's weights set to zero). Received: {name}={value!r}")
    return float(value)


def _check_steps(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"`{name}` must be an integer of at least {minimum}. "
            f"Received: {name}={value!r}")


_UNSET = object()  # No mask computed yet in this fit.


class MagnitudePruning(keras.callbacks.Callback):
    """Prunes kernels to `final_sparsity` during `fit`, by magnitude.

    Every `frequency` steps from `begin_step` to `end_step`, each kernel's
    smallest magnitudes are set to zero, up to the sparsity of
    `polynomial_sparsity` at that step; each kernel reaches it on its own
    (layer-wise). Between updates a `PruningMask` constraint keeps them zero.
    At the end of training every kernel holds the sparsity of the step
    reached (`final_sparsity` exactly, to the element, once `end_step` is
    reached) and the masks are removed: later training no longer keeps the
    zeros.

    The step is the optimizer's `iterations`, so a run resumed with its
    optimizer state (Keras' `BackupAndRestore`, `load_weights` into a model
    whose optimizer is built, tftransfer's checkpoints) resumes the schedule
    with the very masks it had; with a new optimizer it starts over.

    Masks are updated before training steps (`on_train_batch_begin`) and at
    each epoch's start, for loops that call no batch hooks
    (`distributed_fit`).

    Args:
        final_sparsity: The fraction of each kernel's weights that is zero at
            the end, strictly between 0 and 1.
        begin_step: The step where pruning starts. Defaults to `0`.
        end_step: The step where `final_sparsity` is reached. Defaults to
            `None`: the end of the `fit`, the optimizer's `iterations` at its
            first epoch plus `steps * (epochs - initial_epoch)`. A `fit` that
            starts at `initial_epoch` with a new optimizer (a phase after
            others) or with its own restored (a resumed run) ends the same.
        frequency: Steps between two updates of the masks. Defaults to `100`.
        initial_sparsity: The sparsity at `begin_step`. Defaults to `0.0`.
        kernels: The variables to prune. Defaults to `None`:
            `prunable_kernels(model)` of the model `fit` trains. Pass them
            when that model is a wrapper whose Dense layers (a head, a loss)
            are not all to be pruned.
        on_update: `callable(sparsity)` called after each update of the
            masks, e.g. to recalibrate batch normalisation
            (`recalibrate_batch_norm`). Defaults to `None`.

    Raises:
        ValueError: a fraction out of range, or `end_step` not after
            `begin_step`; at the start of training, no kernel to prune, the
            number of steps per epoch unknown without `end_step`, or a kernel
            already pruned by another `MagnitudePruning`.

    Example:

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32),
    ...                           keras.layers.Dense(2)])
    >>> model.compile("adam", "mse")
    >>> x, y = np.ones((64, 16)), np.zeros((64, 2))
    >>> _ = model.fit(x, y, batch_size=16, epochs=3, verbose=0,
    ...               callbacks=[MagnitudePruning(0.75, frequency=2)])
    >>> [layer["sparsity"] for layer in sparsity_report(model)["layers"]]
    [0.75, 0.75]
    """

    def __init__(self, final_sparsity: float, begin_step: int = 0,
                 end_step: Optional[int] = None, frequency: int = 100,
                 initial_sparsity: float = 0.0,
                 kernels: Optional[Sequence] = None,
                 on_update: Optional[Callable] = None):
        super().__init__()
        self.final_sparsity = check_fraction("final_sparsity", final_sparsity, True)
        self.initial_sparsity = check_fraction("initial_sparsity", initial_sparsity,
                                                False)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                "`initial_sparsity` must be at most `final_sparsity`. Received: "
                f"initial_sparsity={initial_sparsity}, final_sparsity={final_sparsity}")
        _check_steps("begin_step", begin_step, 0)
        _check_steps("frequency", frequency, 1)
        if end_step is not None:
            _check_steps("end_step", end_step, begin_step + 1)
        self.begin_step = begin_step
        self.end_step = end_step
        self.frequency = frequency
        self.kernels = None if kernels is None else list(kernels)
        self.on_update = on_update
        self._masks = []  # (kernel, PruningMask) while training.
        self._end = None  # `end_step`, or this fit's end once its first epoch begins.
        self._scheduled = _UNSET

    def on_train_begin(self, logs=None):
        kernels = self.kernels if self.kernels is not None else prunable_kernels(self.model)
        if not kernels:
            raise ValueError(
                f"The model {self.model.name!r} has no trainable Dense or convolution "
                "kernel to prune. Unfreeze some layers, or pass `kernels`.")
        if self.end_step is None and not self.params.get("steps"):
            raise ValueError(
                "`end_step` must be given when `fit` does not know its number of "
                "steps per epoch (a dataset of unknown cardinality, or a loop "
                "that does not say). Received: end_step=None, "
                f"steps={self.params.get('steps')!r}")
        for kernel in kernels:
            if isinstance(kernel.constraint, PruningMask):
                raise ValueError(
                    f"The kernel {kernel.path!r} is pruned already, by another "
                    "MagnitudePruning; use one callback per kernel.")
        self._end, self._scheduled = self.end_step, _UNSET
        # All-ones masks until the first epoch says where the run starts:
        # no step is taken before.
        self._masks = []
        for kernel in kernels:
            constraint = PruningMask(kernel.shape, kernel.dtype, previous=kernel.constraint)
            kernel.constraint = constraint
            self._masks.append((kernel, constraint))
        # A training function traced before the constraints were attached
        # would not apply them: trace it again.
        self.model.make_train_function(force=True)

    def on_epoch_begin(self, epoch, logs=None):
        step = self._step()
        if self._end is None:
            self._end = step + self.params["steps"] * (self.params["epochs"] - epoch)
            if self._end <= self.begin_step:
                self._strip()
                raise ValueError(
                    "`end_step` must be after `begin_step`. Received: "
                    f"begin_step={self.begin_step}, end_step={self._end} (the end "
                    "of this fit)")
        self._update_if_due(step)

    def on_train_batch_begin(self, batch, logs=None):
        self._update_if_due(self._step())

    def on_train_end(self, logs=None):
        if self._end is not None and self._masks:
            # The update due at `end_step` (the final sparsity) comes after
            # the last step: it is taken here.
            self._update_if_due(self._step())
        self._strip()

    def _strip(self) -> None:
        _detach([kernel for kernel, _ in self._masks])
        self._masks = []
        # Its traced function still multiplies by the masks: drop it.
        self.model.train_function = None

    def _step(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _scheduled_step(self, step: int) -> Optional[int]:
        """The step of the last update due at `step`: one every `frequency`
        steps from `begin_step`, and one at `end_step`. A resumed run thereby
        rebuilds the very masks the run had when it stopped."""
        if step < self.begin_step:
            return None
        if step >= self._end:
            return self._end
        return step - (step - self.begin_step) % self.frequency

    def _update_if_due(self, step: int) -> None:
        scheduled = self._scheduled_step(step)
        if scheduled == self._scheduled:
            return
        self._scheduled = scheduled
        sparsity = 0.0  # Before `begin_step`: nothing pruned.
        if scheduled is not None:
            sparsity = polynomial_sparsity(scheduled, self.final_sparsity, self.begin_step,
                                           self._end, self.initial_sparsity)
        for kernel, constraint in self._masks:
            mask = magnitude_mask(kernel, sparsity)
            constraint.mask.assign(mask)
            kernel.assign(kernel * mask)
        if self.on_update is not None:
            self.on_update(sparsity)


def recalibrate_batch_norm(model: keras.Layer, inputs, layers: Sequence) -> None:
    """Sets the moving statistics of `layers` (BatchNormalization layers of
    `model`) to those of `model`'s activations on `inputs`.

    Pruning shrinks the outputs of the layers it prunes, while a frozen batch
    normalisation after them keeps normalising with the statistics of the
    dense network: on MobileNet at 80% sparsity the features collapsed to
    chance (hymenoptera 0.87 to 0.46 validation accuracy). One forward pass
    with these layers in training mode and a momentum of 0 gives each the
    statistics of its new input, in order (each sees the layers below it
    already recalibrated); every other batch normalisation runs in inference
    mode, as a frozen layer does.

    Args:
        model: A model holding `layers`, called on `inputs`.
        inputs: A batch for `model`, e.g. a few hundred training examples.
        layers: The `keras.layers.BatchNormalization` layers to recalibrate.

    Returns:
        `None`; the layers' `moving_mean` and `moving_variance` are set, their
        `trainable` and `momentum` left as they were.

    Example:

    >>> import numpy as np
    >>> norm = keras.layers.BatchNormalization(trainable=False)
    >>> model = keras.Sequential([keras.Input((3,)), norm])
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, (256, 3)).astype("float32")
    >>> recalibrate_batch_norm(model, x, [norm])
    >>> bool(np.allclose(norm.moving_mean.numpy(), x.mean(0), atol=1e-4))
    True
    >>> norm.trainable, norm.momentum
    (False, 0.99)
    """
    chosen = {id(layer) for layer in layers}
    saved = []
    for layer in _walk(model, set()):
        if isinstance(layer, keras.layers.BatchNormalization):
            saved.append((layer, layer.trainable, layer.momentum))
            layer.trainable = id(layer) in chosen
            if id(layer) in chosen:
                layer.momentum = 0.0
    try:
        model(inputs, training=True)
    finally:
        for layer, trainable, momentum in saved:
            layer.trainable, layer.momentum = trainable, momentum


def _detach(kernels) -> int:
    """Applies and removes the `PruningMask` of each kernel; how many had one."""
    count = 0
    for kernel in kernels:
        constraint = kernel.constraint
        if isinstance(constraint, PruningMask):
            kernel.assign(kernel * keras.ops.cast(constraint.mask, kernel.dtype))
            kernel.constraint = constraint.previous
            count += 1
    return count


def strip_pruning(model: keras.Layer) -> keras.Layer:
    """Removes the pruning masks from `model`'s variables, keeping the zeros.

    `MagnitudePruning` does this at the end of training; call it after a
    training that stopped on an error. A kernel's constraint from before
    pruning is put back.

    Args:
        model: A Keras model (or layer).

    Returns:
        `model`, whose variables no longer hold a `PruningMask`.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> model.layers[0].kernel.constraint = PruningMask((4, 2))
    >>> [v.constraint for v in strip_pruning(model).weights]
    [None, None]
    """
    _detach(model.variables)
    if getattr(model, "train_function", None) is not None:
        model.train_function = None
    return model


def _layer_name(variable) -> str:
    parts = variable.path.split("/")
    return parts[-2] if len(parts) > 1 else parts[0]


def sparsity_report(model_or_kernels: Union[keras.Layer, Sequence]) -> dict:
    """The fraction of zeros in each kernel, and in all of them.

    Args:
        model_or_kernels: A model, whose Dense and convolution kernels are
            counted (frozen ones too: they are in its files), or a list of
            variables.

    Returns:
        A JSON-ready dict: `layers`, a list of `{"layer", "variable",
        "weights", "sparsity"}` (one per kernel: a separable convolution has
        two), and `total`, `{"weights", "sparsity"}` over them all.

    Example:

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="d")],
    ...                          name="model")
    >>> model.set_weights([np.array([[0.0, 1.0], [0.0, 0.0]]), np.ones(2)])
    >>> sparsity_report(model)
    {'layers': [{'layer': 'd', 'variable': 'model/d/kernel', 'weights': 4, 'sparsity': 0.75}], 'total': {'weights': 4, 'sparsity': 0.75}}
    """
    if isinstance(model_or_kernels, keras.Layer):
        pairs = [(layer.name, kernel) for layer, kernel in _layer_kernels(model_or_kernels)]
    else:
        pairs = [(_layer_name(kernel), kernel) for kernel in model_or_kernels]
    layers, total_weights, total_zeros = [], 0, 0
    for name, kernel in pairs:
        size = int(tf.size(kernel))
        zeros = int(tf.math.count_nonzero(tf.equal(tf.convert_to_tensor(kernel), 0)))
        layers.append({"layer": name, "variable": kernel.path, "weights": size,
                       "sparsity": round(zeros / size, 6) if size else 0.0})
        total_weights += size
        total_zeros += zeros
    return {"layers": layers,
            "total": {"weights": total_weights,
                      "sparsity": round(total_zeros / total_weights, 6)
                      if total_weights else 0.0}}


class _CountingSink:
    """A write-only file object that counts the bytes written to it."""

    def __init__(self):
        self.size = 0

    def write(self, data) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def gzip_size(path: Union[str, os.PathLike]) -> int:
    """The size in bytes of `path` compressed by gzip (level 9).

    A directory (a SavedModel) counts as one `.tar.gz` of its files: names
    sorted, times and owners cleared, so the size depends on the contents
    alone. It is streamed, never held in memory. Pruned zeros compress, so a
    pruned model's gzip size falls while its plain size does not.

    Args:
        path: A file or a directory.

    Returns:
        The number of compressed bytes.

    Raises:
        FileNotFoundError: `path` does not exist.

    Example:

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "zeros.bin")
    >>> with open(path, "wb") as stream:
    ...     _ = stream.write(bytes(100_000))
    >>> gzip_size(path) < 1_000
    True
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Cannot measure {path!r}: no such file or directory.")
    sink = _CountingSink()
    with gzip.GzipFile(filename="", fileobj=sink, mode="wb", mtime=0) as stream:
        if os.path.isdir(path):
            with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for root, directories, files in os.walk(path):
                    directories.sort()
                    for name in sorted(files):
                        full = os.path.join(root, name)
                        tar.add(full, arcname=os.path.relpath(full, path),
                                recursive=False, filter=_normalized)
        else:
            with open(path, "rb") as source:
                while chunk := source.read(1 << 20):
                    stream.write(chunk)
    return sink.size

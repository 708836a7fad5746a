"""Layer-wise reconstruction of pruned kernels: the weights kept are refitted so
that each pruned layer's output matches the dense network's.

Magnitude pruning zeroes weights and leaves the others as they were, so each
pruned layer's output drifts from what the layers above were trained on, and
the drift adds up layer after layer. With little data, fine-tuning cannot win
the lost features back: on hymenoptera (245 training images) `--prune 0.8`
of MobileNet 0.75's top lost 0.065 of test accuracy. Refitting the kept
weights by least squares, layer by layer, on the inputs the pruned layers
below now give, to the dense network's outputs is what the pruning methods
after Hassibi and Stork's Optimal Brain Surgeon do (ThiNet, Luo et al. 2017;
He et al. 2017; SparseGPT, Frantar and Alistarh 2023): it needs no labels,
only a few hundred examples, and it is a closed-form fit.

Keras and TensorFlow have no such fit, so it is written here: for each output
channel the kept weights `w` minimise `|X w - y|^2 + damping |w|^2`, solved
for all channels at once by conjugate gradients on the masked normal
equations (each channel has its own mask).

`--prune` refits after each update of its masks (the engine's
`pruning_callback`); `--prune-filters` refits the convolutions that lost
input channels once, before training (`refit_pruned_filters`).

Only kernels that act on one position at a time are refitted (`Dense`, and
1x1 `Conv2D`: MobileNet's and EfficientNet's pointwise convolutions, which
hold nearly all of their weights); `reconstructable` says which.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

# Rows (example, position) sampled per example and layer for the fit.
ROWS_PER_EXAMPLE = 16
# Tikhonov damping, relative to the mean of the inputs' second moments
# (SparseGPT's 1%): keeps the masked systems well-posed.
DAMPING = 0.01
# Conjugate-gradient iterations: at most this many, fewer once converged.
ITERATIONS = 60


def reconstructable(layer) -> bool:
    """Whether `layer`'s kernel can be refitted: a `Dense`, or a `Conv2D`
    with a 1x1 kernel, stride 1 and one group."""
    if type(layer) is keras.layers.Dense:
        return True
    return (type(layer) is keras.layers.Conv2D
            and tuple(layer.kernel_size) == (1, 1)
            and tuple(layer.strides) == (1, 1) and layer.groups == 1)


class DenseTargets:
    """The dense network's outputs of each layer to refit, on sampled rows.

    Captured once, before pruning, and matched by `reconstruct` after each
    update of the masks.

    Args:
        network: A functional model whose graph holds `layers` (their
            inputs are taken from it; the targets are what each layer's
            kernel and bias compute from them).
        layers: The layers to refit, bottom to top (`reconstructable`).
        inputs: A batch for `network`: a few hundred training examples.
        seed: Chooses the sampled rows. Defaults to `0`.
    """

    def __init__(self, network: keras.Model, layers: Sequence, inputs, seed: int = 0):
        bad = [layer.name for layer in layers if not reconstructable(layer)]
        if bad:
            raise ValueError("Only Dense layers and 1x1 Conv2D layers can be "
                             f"reconstructed. Received: {bad}")
        self.network, self.layers, self.inputs = network, list(layers), inputs
        rng = np.random.default_rng(seed)
        self.rows, self.targets = [], []
        for layer, values in zip(self.layers,
                                 _layer_inputs(network, self.layers, inputs)):
            flat = values.reshape(-1, values.shape[-1])
            per_example = flat.shape[0] // len(inputs)
            rows = np.concatenate([
                base + rng.choice(per_example, min(ROWS_PER_EXAMPLE, per_example),
                                  replace=False)
                for base in range(0, flat.shape[0], per_example)])
            x, kernel = _with_bias(layer, flat[rows].astype(np.float64))
            self.rows.append(rows)
            # Before the activation: what the kernel and bias compute.
            self.targets.append(x @ kernel)


def reconstruct(targets: DenseTargets, network=None, layers=None,
                outputs=None) -> list:
    """Refits the kept (non-zero) weights of each of `targets.layers`, bottom
    to top, so that its output on the pruned network's inputs matches the
    dense network's (`targets`). Zeros stay zero; biases are refitted too.

    Args:
        targets: The dense network's outputs (`DenseTargets`).
        network: The pruned network, when it is another model than the one
            the targets were taken from (a narrower copy, `prune_filters`).
            Defaults to `None`: `targets.network`, pruned in place.
        layers: `network`'s layers matching `targets.layers`, in order.
        outputs: Per layer, the indices of the dense layer's output channels
            that the pruned one keeps, or `None` for all. Defaults to `None`.

    Returns:
        Per layer, the relative error `|X w - y| / |y|` of its output before
        and after the fit (never worse than before: a fit that is not better
        is not applied).
    """
    network = network or targets.network
    layers = list(layers or targets.layers)
    outputs = outputs or [None] * len(layers)
    errors = []
    for index, layer in enumerate(layers):
        (inputs,) = _layer_inputs(network, [layer], targets.inputs)
        x = inputs.reshape(-1, inputs.shape[-1])[targets.rows[index]].astype(np.float64)
        y = targets.targets[index]
        if outputs[index] is not None:
            y = y[:, outputs[index]]
        shape = tuple(layer.kernel.shape)
        x, kernel = _with_bias(layer, x)
        mask = kernel != 0
        if layer.use_bias:  # The bias is never pruned.
            mask[-1] = True
        before = _relative_error(x, kernel, y)
        fitted = _masked_least_squares(x, y, mask, kernel)
        after = _relative_error(x, fitted, y)
        if after < before:  # Never worse than the pruned weights.
            if layer.use_bias:
                layer.bias.assign(fitted[-1].astype(layer.bias.dtype))
                fitted = fitted[:-1]
            layer.kernel.assign(fitted.reshape(shape).astype(layer.kernel.dtype))
        errors.append((before, min(before, after)))
    return errors


def _relative_error(x, kernel, y) -> float:
    return float(np.linalg.norm(x @ kernel - y) / (np.linalg.norm(y) or 1.0))


def _masked_least_squares(x, y, mask, start):
    """Per column j: argmin over w with w[~mask[:, j]] = 0 of
    |x w - y[:, j]|^2 + damping * mean(diag(x'x)) |w|^2, by conjugate
    gradients run on all columns at once, from `start`."""
    gram = x.T @ x / len(x)
    gram[np.diag_indices_from(gram)] += DAMPING * np.mean(np.diag(gram))
    right = mask * (x.T @ y / len(x))

    def apply(v):
        return mask * (gram @ (mask * v))

    weights = mask * start
    residual = right - apply(weights)
    direction = residual.copy()
    norms = np.sum(residual * residual, 0)
    first = norms.copy()
    for _ in range(ITERATIONS):
        if np.all(norms <= 1e-12 * first):  # Relative: activations may be tiny.
            break
        product = apply(direction)
        curvature = np.sum(direction * product, 0)
        step = np.where(curvature > 0, norms / np.where(curvature > 0, curvature, 1), 0)
        weights += step * direction
        residual -= step * product
        new = np.sum(residual * residual, 0)
        direction = residual + np.where(norms > 0, new / np.where(norms > 0, norms, 1),
                                        0) * direction
        norms = new
    return mask * weights


def _input_in(network: keras.Model, layer) -> keras.KerasTensor:
    """`layer`'s input tensor in `network`'s own graph.

    A layer called in two graphs (a backbone, and the top `split_backbone`
    builds from its tensors, whose input Keras clones) has one node in each;
    `layer.input` is the first's. Keras keeps no public map from a model to
    its nodes, so `_nodes_by_depth` is read.
    """
    nodes = {id(node) for depth in network._nodes_by_depth.values() for node in depth}
    for node in layer._inbound_nodes:
        if id(node) in nodes:
            return node.input_tensors[0]
    raise ValueError(f"The layer {layer.name!r} is not in the model {network.name!r}.")


def _with_bias(layer, x) -> tuple:
    """`(x, kernel)` as float64 matrices; with a bias, `x` gains a column of
    ones and `kernel` the bias as its last row."""
    kernel = np.asarray(layer.kernel.numpy(), np.float64).reshape(-1, layer.kernel.shape[-1])
    if layer.use_bias:
        x = np.concatenate([x, np.ones((len(x), 1))], 1)
        kernel = np.concatenate([kernel, np.asarray(layer.bias.numpy(), np.float64)[None]])
    return x, kernel


def _layer_inputs(network, layers, inputs) -> list:
    """Each layer's input in `network`'s graph, as numpy arrays, on `inputs`."""
    # One input given alone: Keras warns when a list is called with a tensor.
    model = keras.Model(network.inputs[0] if len(network.inputs) == 1 else network.inputs,
                        [_input_in(network, layer) for layer in layers])
    outputs = model(inputs, training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [np.asarray(output) for output in outputs]

"""Where to cut a backbone: a linear probe at each of its blocks' outputs.

A frozen backbone is often deeper than a task needs: for images far from
ImageNet, intermediate layers transfer as well as the last or better
(Kornblith et al. 2019; Head2Toe, Evci et al. 2022), and every layer after the
best cut is paid for on every served image. `probe_cuts` runs the backbone once
over the images with an output at each candidate cut (`cut_points`: block
outputs where the graph crosses at one tensor), pools each, trains a linear
head on each cut's features (all heads in one Keras model, one `fit`), and
measures what the network kept up to each cut costs. `truncate` then cuts the
backbone there: a `load_backbone`-shaped model holding only the layers kept.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tftransfer.graph import backbone_network


def _network(backbone: keras.Model) -> keras.Model:
    """The Keras Applications network of a `load_backbone` model, refusing
    what cannot be cut (a hub module, a fusion)."""
    if not any(isinstance(layer, keras.Model) for layer in backbone.layers):
        if backbone.layers and isinstance(backbone.layers[-1],
                                          keras.layers.GlobalAveragePooling2D):
            return backbone  # A bare Keras Applications network.
        raise ValueError(
            "Cutting needs a backbone whose layers can be seen: a Keras "
            "Applications backbone from `load_backbone`. A TF-Hub or SavedModel "
            f"module is one opaque layer. Received: a model named {backbone.name!r}")
    if sum(isinstance(layer, keras.Model) for layer in backbone.layers) > 1:
        raise ValueError("A fusion of several backbones has no single depth to "
                         "cut: probe and cut each member on its own.")
    return backbone_network(backbone)


# Folds of the probe's cross-validation over the training and validation images.
CV_FOLDS = 5
# Steps per epoch of the linear heads, at most: larger folders take larger batches.
MAX_STEPS_PER_EPOCH = 4

# Layers that finish the tensor below them: cutting before one would pool a
# half-computed block (`Conv_1_bn` before `out_relu`).
_FINISHING = (keras.layers.BatchNormalization, keras.layers.Activation,
              keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.PReLU,
              keras.layers.ELU, keras.layers.Softmax)


def _block_key(name: str) -> tuple:
    """The block a layer belongs to, from the numbers Keras Applications put in
    layer names: `conv_pw_3_relu` is in block (3,), `conv4_block2_1_conv` in
    (4, 2) (a third number counts layers inside a block)."""
    numbers = re.findall(r"\d+", name)
    return tuple(numbers[:2]) if len(numbers) >= 3 else tuple(numbers)


def _single_tensor_cuts(network: keras.Model) -> list:
    """Indices `i` of the layers after which exactly one tensor, the output of
    layer `i`, crosses to the layers above: the graph can be cut there."""
    layers = network.layers
    producer, last_use = {}, {}
    for index, layer in enumerate(layers):
        for tensor in keras.tree.flatten(layer.output):
            producer[id(tensor)] = index
    for index, layer in enumerate(layers[1:], start=1):
        for tensor in keras.tree.flatten(layer.input):
            last_use[id(tensor)] = max(last_use.get(id(tensor), 0), index)
    crossing = np.zeros(len(layers) + 1, "int64")  # Live tensors after layer i.
    for key, made in producer.items():
        used = last_use.get(key, made)
        if used > made:
            crossing[made] += 1
            crossing[used] -= 1
    crossing = np.cumsum(crossing)
    cuts = []
    for index, layer in enumerate(layers[:-1]):
        outputs = keras.tree.flatten(layer.output)
        if (crossing[index] == 1 and len(outputs) == 1
                and last_use.get(id(outputs[0]), index) > index):
            cuts.append(index)
    return cuts


def cut_points(backbone: keras.Model) -> list:
    """The layers a backbone can be cut after: its blocks' outputs.

    A cut point is a layer whose output is the only tensor its graph passes to
    the layers above (a residual block is never cut in its middle), at the end
    of a block as the network's layer names number them, with feature maps
    (height, width, channels) to pool. The last is the network's final
    feature map: cutting there keeps the whole network.

    Args:
        backbone: A model from `load_backbone`, or a Keras Applications
            network built with `pooling="avg"`.

    Returns:
        Layer names of the network, from the input up.

    Raises:
        ValueError: a hub module or a fusion, which cannot be cut.

    Example:

    >>> from tftransfer.backbones import load_backbone
    >>> backbone = load_backbone("vgg16", weights=None, image_size=32)
    >>> cut_points(backbone)[:3]
    ['block1_conv1', 'block1_conv2', 'block1_pool']
    >>> cut_points(backbone)[-1]
    'block5_pool'
    """
    network = _network(backbone)
    layers = network.layers
    final = keras.tree.flatten(layers[-1].input)[0]
    weighted = False
    names = []
    for index in _single_tensor_cuts(network):
        layer, above = layers[index], layers[index + 1]
        weighted = weighted or any(layer_.weights for layer_ in layers[:index + 1])
        output = keras.tree.flatten(layer.output)[0]
        if output is final:
            names.append(layer.name)
            continue
        if (weighted and len(output.shape) == 4
                and not isinstance(above, _FINISHING)
                and _block_key(layer.name) != _block_key(above.name)):
            names.append(layer.name)
    return names


def _check_layer(backbone: keras.Model, layer: str) -> list:
    points = cut_points(backbone)
    if layer not in points:
        raise ValueError(
            f"`cut` must be one of the network's cut points (`tftransfer probe` "
            f"lists them with their accuracy) or \"auto\": {', '.join(points)}. "
            f"Received: cut={layer!r}")
    return points


def truncate(backbone: keras.Model, layer: str) -> keras.Model:
    """The backbone cut after `layer`: the layers above it are gone.

    The kept layers (and their weights) are the backbone's own, pooled as the
    backbone pooled its last feature map, so the result is a `load_backbone`
    model in every way (a head built on it trains, fine-tunes and exports),
    only shallower. Cutting at the last cut point keeps the whole network and
    returns `backbone` itself.

    Args:
        backbone: A model from `load_backbone`.
        layer: One of `cut_points(backbone)`.

    Returns:
        A `keras.Model` named as `backbone`, whose nested network is named
        `<network>_to_<layer>`.

    Raises:
        ValueError: `layer` is not a cut point (the message lists them), or the
            backbone cannot be cut.

    Example:

    >>> from tftransfer.backbones import load_backbone
    >>> backbone = load_backbone("mobilenet", weights=None, image_size=32,
    ...                          alpha=0.25)
    >>> short = truncate(backbone, "conv_pw_5_relu")
    >>> short.output_shape, backbone.output_shape
    ((None, 64), (None, 256))
    >>> len(backbone_network(short).layers) < len(backbone_network(backbone).layers)
    True
    >>> truncate(backbone, "conv_pw_13_relu") is backbone
    True
    """
    points = _check_layer(backbone, layer)
    if layer == points[-1]:
        return backbone
    network = _network(backbone)
    pooling = network.layers[-1]
    tensor = network.get_layer(layer).output
    pooled = type(pooling).from_config(pooling.get_config())(tensor)
    kept = keras.Model(network.inputs[0], pooled, name=f"{network.name}_to_{layer}")
    return _wrap(backbone, network, kept, backbone.name)


def _wrap(backbone, network, replacement, name) -> keras.Model:
    """`backbone` with its nested `network` replaced (its other layers, the
    preprocessing, are shared)."""
    if backbone is network:
        return replacement
    inputs = keras.Input(backbone.inputs[0].shape[1:], name="pixels")
    x = inputs
    for layer in backbone.layers[1:]:
        x = replacement(x) if layer is network else layer(x)
    return keras.Model(inputs, x, name=name)


def probe_network(backbone: keras.Model, layers: list,
                  joined: bool = False) -> keras.Model:
    """One model with the backbone's pooled features at each of `layers`:
    one forward pass serves every cut. With `joined`, one output: the cuts'
    features side by side (`cut_widths` each), as the probe caches them."""
    network = _network(backbone)
    pooling = network.layers[-1]
    outputs = []
    for name in layers:
        tensor = network.get_layer(name).output
        if tensor is keras.tree.flatten(pooling.input)[0]:
            outputs.append(network.outputs[0])
        else:
            outputs.append(type(pooling).from_config(
                {**pooling.get_config(), "name": f"probe_pool_{len(outputs)}"})(tensor))
    if joined:
        outputs = (keras.layers.Concatenate(name="probe_joined")(outputs)
                   if len(outputs) > 1 else outputs[0])
    probes = keras.Model(network.inputs[0], outputs, name=f"{network.name}_probes")
    return _wrap(backbone, network, probes, "probes")


def cut_widths(backbone: keras.Model, layers: list) -> list:
    """The width of the pooled features at each of `layers`: their channels."""
    network = _network(backbone)
    return [int(network.get_layer(name).output.shape[-1]) for name in layers]


def multiply_adds(network: keras.Model) -> int:
    """Multiply-adds of one image through `network`'s convolutions and dense
    layers (batch normalisation folds into them when served)."""
    total = 0
    for layer in _all_layers(network):
        if not layer.weights:
            continue
        output = layer.output.shape
        spatial = int(np.prod(output[1:-1])) if len(output) > 2 else 1
        kernel = layer.weights[0].shape
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            total += spatial * int(np.prod(kernel))
        elif isinstance(layer, keras.layers.SeparableConv2D):
            total += spatial * (int(np.prod(kernel))
                                + int(np.prod(layer.weights[1].shape)))
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            total += spatial * int(np.prod(kernel))
    return total


def _all_layers(model: keras.Model) -> list:
    layers = []
    for layer in model.layers:
        layers.extend(_all_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return layers


def measure_latency(model: keras.Model, repeats: int = 10) -> float:
    """Median milliseconds of one image through `model` (compiled, after two
    warm-up calls): what a served image costs on this machine."""
    pixels = tf.random.stateless_uniform((1, *model.input_shape[1:]), (0, 0),
                                         maxval=255.0)
    forward = tf.function(lambda x: model(x, training=False), autograph=False)
    for _ in range(2):
        forward(pixels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        keras.ops.convert_to_numpy(forward(pixels))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def measure_cut_latencies(backbone: keras.Model, layers: list,
                          repeats: int = 20) -> list:
    """Median milliseconds of one image through `backbone` cut after each of
    `layers`, all from one compiled function.

    Compiling a network per cut cost about 0.5 s each (20 cuts of MobileNetV2:
    10 s, more than the heads). Instead the network runs in segments, from one
    cut point to the next (the graph crosses each at one tensor), with a
    timestamp after each cut's output that the next segment waits for. A cut's
    latency is its timestamp minus the start's, plus the call's own overhead
    outside the graph (the median call time less the in-graph time), which a
    served model pays too. The cut's pooling, one mean over its feature map,
    is not counted.

    Args:
        backbone: A model from `load_backbone`.
        layers: Cut points of the backbone (`cut_points`), from the input up.
        repeats: Timed calls after two warm-up calls. Defaults to `20`.

    Returns:
        One latency per layer, in milliseconds, non-decreasing.
    """
    network = _network(backbone)
    points = cut_points(backbone)
    unknown = [layer for layer in layers if layer not in points]
    if unknown:
        raise ValueError(f"Not cut points of the network: {unknown}")
    asked, layers = list(layers), sorted(set(layers), key=points.index)
    tensors = [network.inputs[0]] + [network.get_layer(name).output for name in layers]
    segments = [keras.Model(begin, end) for begin, end in zip(tensors[:-1], tensors[1:])]
    pooling = network.layers[-1]
    pool = type(pooling).from_config(pooling.get_config())
    before = [] if backbone is network else backbone.layers[
        1:[layer is network for layer in backbone.layers].index(True)]

    @tf.function(autograph=False)
    def stamped(x):
        start = tf.timestamp()
        with tf.control_dependencies([start]):
            x = tf.identity(x)
        for layer in before:  # The backbone's preprocessing.
            x = layer(x)
        stamps = []
        for segment in segments:
            x = segment(x, training=False)
            with tf.control_dependencies([x]):
                stamps.append(tf.timestamp())
            with tf.control_dependencies([stamps[-1]]):
                x = tf.identity(x)
        return tf.stack(stamps) - start, pool(x)

    pixels = tf.random.stateless_uniform((1, *backbone.input_shape[1:]), (0, 0),
                                         maxval=255.0)
    for _ in range(2):
        stamped(pixels)
    inside, calls = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        elapsed, pooled = stamped(pixels)
        keras.ops.convert_to_numpy(pooled)
        calls.append(time.perf_counter() - start)
        inside.append(elapsed.numpy())
    inside = np.median(np.stack(inside), 0)
    overhead = max(float(np.median(calls)) - float(inside[-1]), 0.0)
    latencies = np.maximum.accumulate(inside + overhead) * 1000
    order = {name: index for index, name in enumerate(layers)}
    return [float(latencies[order[name]]) for name in asked]


def fit_linear_probes(train: list, train_labels, validation: list, validation_labels,
                      num_classes: int, epochs: int = 50, batch_size: int = 256,
                      learning_rate: float = 3e-3, seed: int = 0,
                      folds: int = CV_FOLDS) -> tuple:
    """Accuracy of a linear head on each cut's features: on the validation
    split, and cross-validated over the training and validation images.

    A validation split of a few dozen images scores a cut to within a few
    images, and among a dozen cuts one of the shallow ones then ties with
    the best by chance; `folds`-fold cross-validation over both splits scores
    every image. Features are standardised (early layers' scales differ by
    orders of magnitude) with the mean and deviation of both splits, labels
    unseen. Every head is a softmax regression on its own loss, and all of
    them, the held-out split's and each fold's, step together in one compiled
    function: Keras' `fit` on a model with a head per cut spent seconds
    setting up its 13 losses and metrics for 245 images.

    Args:
        train: Per cut, the training split's pooled features `(n, width)`.
        train_labels: Their integer labels.
        validation: Per cut, the validation split's features.
        validation_labels: Their labels.
        num_classes: Number of classes.
        epochs: Passes over both splits. Defaults to `50`.
        batch_size: Examples per step, at least: a split of more than
            `MAX_STEPS_PER_EPOCH` batches takes larger ones. Defaults to `256`.
        learning_rate: Adam's rate. Defaults to `3e-3`.
        seed: Initialisation, folds and shuffling. Defaults to `0`.
        folds: Folds of the cross-validation. Defaults to `CV_FOLDS`.

    Returns:
        `(val_accuracies, cv_accuracies)`, one per cut, after the last epoch.
    """
    features = [np.concatenate([a, b]).astype("float32")
                for a, b in zip(train, validation)]
    # Each step costs mostly its fixed overhead (a dozen cuts' ops, whatever
    # the batch), so a large folder takes larger batches, not more steps:
    # 50 epochs of 256 were 700 steps and 20 s on 3,450 images.
    batch_size = max(batch_size, -(-len(features[0]) // MAX_STEPS_PER_EPOCH))
    features = [(x - x.mean(0)) / (x.std(0) + 1e-6) for x in features]
    labels = np.concatenate([train_labels, validation_labels]).astype("int32")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), "int64")
    fold[rng.permutation(len(labels))] = np.arange(len(labels)) % folds
    is_validation = np.arange(len(labels)) >= len(train_labels)
    # Group 0 trains on the training split; group g (1..folds) on all images
    # outside fold g - 1.
    groups = np.stack([~is_validation] + [fold != g for g in range(folds)], 1)
    groups = groups.astype("float32")
    # Every cut's kernel in one variable, `(features, group * class)`, rows in
    # the cuts' order, and one matrix of all cuts' features: one gather and
    # one Adam update a step instead of one per cut. Adjacent cuts of the same
    # width (MobileNetV2's blocks) share one batched product. Together these
    # took 3,430 images' heads from 5.8 to 3.4 s, with the same accuracies.
    num_groups = len(groups[0])
    kernel = tf.Variable(np.concatenate(
        [rng.normal(0, 0.01, (num_groups, x.shape[1], num_classes)).transpose(1, 0, 2)
         .reshape(x.shape[1], -1) for x in features]).astype("float32"))
    bias = tf.Variable(tf.zeros((len(features), num_groups, num_classes)))
    runs, begin = [], 0  # (first column, cuts, width) of equal-width cuts.
    for width in [x.shape[1] for x in features]:
        if runs and runs[-1][2] == width and runs[-1][0] + runs[-1][1] * width == begin:
            runs[-1][1] += 1
        else:
            runs.append([begin, 1, width])
        begin += width
    features = np.concatenate(features, 1)
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build([kernel, bias])

    def logits(x):
        """`(batch, group, cut, class)`."""
        per_run = []
        for begin, cuts, width in runs:
            end = begin + cuts * width
            x_run = tf.reshape(x[:, begin:end], [-1, cuts, width])
            kernel_run = tf.reshape(kernel[begin:end], [cuts, width, -1])
            per_run.append(tf.einsum("bkd,kdh->bkh", x_run, kernel_run))
        out = tf.concat(per_run, 1)  # (batch, cut, group * class)
        out = tf.reshape(out, [-1, bias.shape[0], num_groups, num_classes]) + bias
        return tf.transpose(out, [0, 2, 1, 3])

    inputs_all = tf.constant(features)
    labels_all, groups_all = tf.constant(labels), tf.constant(groups)

    @tf.function(autograph=False, reduce_retracing=True)
    def step(batch):
        inputs, targets, weights = (tf.gather(inputs_all, batch),
                                    tf.gather(labels_all, batch),
                                    tf.gather(groups_all, batch))
        targets = tf.broadcast_to(targets[:, None, None], tf.concat(
            [tf.shape(targets), [num_groups, bias.shape[0]]], 0))
        with tf.GradientTape() as tape:
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits(inputs))
            # Each cut's loss is its mean over the images of each group.
            loss = (tf.reduce_sum(losses * weights[:, :, None])
                    / tf.maximum(tf.reduce_sum(weights), 1.0))
        optimizer.apply(tape.gradient(loss, [kernel, bias]), [kernel, bias])

    for _ in range(epochs):
        order = rng.permutation(len(labels))
        for begin in range(0, len(order), batch_size):
            batch = order[begin:begin + batch_size]
            step(batch)
    right = np.argmax(logits(inputs_all).numpy(), -1) == labels[:, None, None]
    val_accuracies = right[is_validation, 0].mean(0).tolist()
    cv_accuracies = right[np.arange(len(labels)), fold + 1].mean(0).tolist()
    return val_accuracies, cv_accuracies


def choose_cut(cuts: list, tolerance: float = 0.01) -> dict:
    """The shallowest cut whose accuracy is within `tolerance` of the best
    cut's: what `train --cut auto` takes. The accuracy is `cv_accuracy`
    (cross-validated over the training and validation images) when the cuts
    have it, else `val_accuracy`.

    Args:
        cuts: `probe_cuts`' list, from the input up.
        tolerance: Accuracy the cut may lose against the best.
            Defaults to `0.01`.

    Returns:
        One of `cuts`.

    Example:

    >>> cuts = [{"layer": "a", "val_accuracy": 0.70},
    ...         {"layer": "b", "val_accuracy": 0.895},
    ...         {"layer": "c", "val_accuracy": 0.90}]
    >>> choose_cut(cuts)["layer"], choose_cut(cuts, tolerance=0.0)["layer"]
    ('b', 'c')
    """
    key = "cv_accuracy" if all("cv_accuracy" in cut for cut in cuts) else "val_accuracy"
    best = max(cut[key] for cut in cuts)
    return next(cut for cut in cuts if cut[key] >= best - tolerance)


def probe_examples(backbone: keras.Model, examples, cache_for: Optional[Callable] = None,
                   epochs: int = 50, seed: int = 0, latency: bool = True,
                   jit_compile: bool = False, verbose=0) -> tuple:
    """`probe_cuts` on `tftransfer.examples` (`FolderExamples` or
    `DatasetExamples`), all cuts' features of an image in one entry of the
    cache `cache_for(backbone, probe_cuts=layers)` returns (or `None`).

    One entry per image, not one per cut: 20 cuts of MobileNetV2 on 4,317
    images were 86,000 files, whose creation cost a third as much as the
    forward pass. A run cut at one layer copies its cut's features out of
    it (`probe_run.fill_cut_cache`).

    Returns:
        `(cuts, stats)`: `probe_cuts`' list, and per split the `CacheStats`
        of the pass as a dict, with `seconds` per stage (`build`, `forward`,
        `heads`, `latency`).
    """
    started = time.perf_counter()
    layers = cut_points(backbone)
    networks = [truncate(backbone, layer) for layer in layers]
    cache = cache_for(backbone, probe_cuts=layers) if cache_for else None
    probes = probe_network(backbone, layers, joined=True)
    splits = np.cumsum(cut_widths(backbone, layers))[:-1]
    timings = {"build": time.perf_counter() - started}
    started = time.perf_counter()
    features, stats = {}, {}
    for split in ("train", "validation"):
        joined, counted = examples.outputs(probes, cache, split,
                                           jit_compile=jit_compile, verbose=verbose)
        features[split] = np.split(joined, splits, axis=1)
        stats[split] = counted._asdict()
    timings["forward"] = time.perf_counter() - started
    started = time.perf_counter()
    num_classes = int(max(examples.labels("train").max(),
                          examples.labels("validation").max())) + 1
    accuracies, cross_validated = fit_linear_probes(
        list(features["train"]), examples.labels("train"),
        list(features["validation"]), examples.labels("validation"),
        num_classes, epochs=epochs, seed=seed)
    timings["heads"] = time.perf_counter() - started
    started = time.perf_counter()
    latencies = (measure_cut_latencies(backbone, layers) if latency
                 else [None] * len(layers))
    cuts = []
    for layer, network, accuracy, cv_accuracy, latency_ms in zip(
            layers, networks, accuracies, cross_validated, latencies):
        inner = backbone_network(network) if network is not _network(network) else network
        cuts.append({
            "layer": layer,
            "layers": len(inner.layers),
            "params": int(network.count_params()),
            "madds": multiply_adds(network),
            "latency_ms": None if latency_ms is None else round(latency_ms, 3),
            "val_accuracy": accuracy,
            "cv_accuracy": cv_accuracy,
        })
    timings["latency"] = time.perf_counter() - started
    stats["seconds"] = {name: round(value, 2) for name, value in timings.items()}
    return cuts, stats


def probe_cuts(backbone: keras.Model, train: tf.data.Dataset,
               validation: tf.data.Dataset, epochs: int = 50, seed: int = 0,
               latency: bool = True) -> list:
    """How well a linear head does on the features at each cut of a backbone.

    The backbone runs once over the images, with an output at every cut
    point; a linear head trains on each cut's pooled features.

    Args:
        backbone: A model from `load_backbone` (frozen; it is not changed).
        train: Batches of `(pixels 0..255, integer label)`, as for `fit`,
            giving the same images each pass.
        validation: The same, for the accuracy of each head.
        epochs: Epochs of each linear head. Defaults to `50`.
        seed: The heads' initialisation and shuffling. Defaults to `0`.
        latency: Measure each truncated network's latency (batch 1).
            Defaults to `True`.

    Returns:
        One dict per cut point, from the input up: `layer`, `layers` (of the
        network kept, pooling included), `params`, `madds` (multiply-adds per
        image), `latency_ms`, `val_accuracy` (of a head trained on `train`)
        and `cv_accuracy` (`CV_FOLDS`-fold cross-validated over `train` and
        `validation`). `choose_cut(cuts, tolerance)`
        picks the shallowest within `tolerance` of the best; `truncate` cuts.

    Example:

    >>> import numpy as np, tensorflow as tf
    >>> from tftransfer.backbones import load_backbone
    >>> backbone = load_backbone("vgg16", weights=None, image_size=32)
    >>> pixels = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3))
    >>> labels = np.arange(16) % 2
    >>> data = tf.data.Dataset.from_tensor_slices(
    ...     (pixels.astype("float32"), labels)).batch(8)
    >>> cuts = probe_cuts(backbone, data, data, epochs=2, latency=False)
    >>> [cut["layer"] for cut in cuts][-2:]
    ['block5_conv3', 'block5_pool']
    >>> sorted(cuts[0])
    ['cv_accuracy', 'latency_ms', 'layer', 'layers', 'madds', 'params', 'val_accuracy']
    >>> cuts[0]["params"] < cuts[-1]["params"]
    True
    """
    from tftransfer.examples import DatasetExamples

    examples = DatasetExamples({"train": train, "validation": validation})
    return probe_examples(backbone, examples, epochs=epochs, seed=seed,
                          latency=latency)[0]

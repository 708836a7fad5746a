import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer.folding import foldable_batch_norms, folded_values, run_folded
from tftransfer.packing import PackedWeights


def _randomise(layer, rng):
    """Batch normalisation statistics and weights far from their defaults."""
    for variable in layer.weights:
        low = 0.5 if "variance" in variable.path or "gamma" in variable.path else -2.0
        variable.assign(rng.uniform(low, 2.0, variable.shape).astype(variable.dtype))


def _norm(rng, **options):
    layer = keras.layers.BatchNormalization(**options)
    layer.build((None, 5, 5, 4) if options.get("axis", -1) != 1 else (None, 4, 5, 5))
    _randomise(layer, rng)
    return layer


@pytest.mark.parametrize("options", [{}, {"center": False}, {"scale": False},
                                     {"axis": 1, "epsilon": 0.1}])
def test_the_scale_and_offset_compute_the_layer(options):
    rng = np.random.default_rng(0)
    layer = _norm(rng, **options)
    shape = (3, 5, 5, 4) if options.get("axis", -1) != 1 else (3, 4, 5, 5)
    x = rng.normal(size=shape).astype("float32")
    scale, offset = folded_values(layer)
    broadcast = [1, 1, 1, -1] if options.get("axis", -1) != 1 else [1, -1, 1, 1]
    np.testing.assert_allclose(x * scale.reshape(broadcast) + offset.reshape(broadcast),
                               layer(x, training=False), rtol=1e-5, atol=1e-5)


def _nested_model(rng):
    """Batch normalisation in the top graph, a nested functional model, a
    nested Sequential, shared by two branches, and inside a subclassed layer
    (which `run_folded` does not reach)."""

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.norm = keras.layers.BatchNormalization()

        def call(self, x, training=None):
            return self.norm(x, training=training)

    inner_in = keras.Input((6, 6, 4))
    inner = keras.Model(inner_in, keras.layers.BatchNormalization()(
        keras.layers.Conv2D(4, 3, padding="same")(inner_in)), name="inner")
    sequential = keras.Sequential([keras.Input((6, 6, 4)),
                                   keras.layers.BatchNormalization(),
                                   keras.layers.ReLU()], name="seq")
    shared = keras.layers.BatchNormalization(name="shared")
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 1)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = sequential(inner(x))
    x = Block()(shared(x)) + shared(x)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            _randomise(layer, rng)
    return model


def test_a_nested_model_runs_folded_as_it_runs():
    rng = np.random.default_rng(1)
    model = _nested_model(rng)
    folded = foldable_batch_norms(model)
    # Top graph, nested model, Sequential, the shared one once; not the Block's.
    assert len(folded) == 4
    assert len({id(layer) for layer in folded}) == 4
    folds = {id(layer): tuple(tf.constant(v) for v in folded_values(layer))
             for layer in folded}
    x = rng.uniform(0, 1, (2, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(run_folded(model, x, folds), model(x, training=False),
                               rtol=1e-4, atol=1e-5)


def test_the_packed_trace_reads_no_folded_weight_and_keeps_the_outputs():
    rng = np.random.default_rng(2)
    model = _nested_model(rng)
    packed = PackedWeights(model)
    function = tf.function(packed, input_signature=[tf.TensorSpec([None, 6, 6, 3])],
                           autograph=False).get_concrete_function()
    assert packed.covers(function)
    kinds = {op.type for op in function.graph.get_operations()}
    assert "Rsqrt" in kinds  # The Block's own batch normalisation, unfolded.
    rsqrt = [op for op in function.graph.get_operations() if op.type == "Rsqrt"]
    assert len(rsqrt) == 1
    x = rng.uniform(0, 1, (3, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(function(tf.constant(x)), model(x, training=False),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_folds_in_float32_and_returns_the_layer_dtype(policy):
    rng = np.random.default_rng(3)
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 1, dtype=policy)(inputs)
    outputs = keras.layers.BatchNormalization(dtype=policy)(x)
    model = keras.Model(inputs, outputs)
    _randomise(model.layers[2], rng)
    packed = PackedWeights(model)
    function = tf.function(packed, input_signature=[tf.TensorSpec([None, 6, 6, 3])],
                           autograph=False).get_concrete_function()
    assert packed.covers(function)
    assert not any(op.type == "Rsqrt" for op in function.graph.get_operations())
    x = rng.uniform(0, 1, (2, 6, 6, 3)).astype("float32")
    folded, plain = function(tf.constant(x)), model(x, training=False)
    assert folded.dtype == plain.dtype == policy.replace("mixed_", "")
    np.testing.assert_allclose(np.float32(folded), np.float32(plain),
                               rtol=2e-2, atol=2e-2)


def test_channels_first_normalisation_runs_folded():
    rng = np.random.default_rng(4)
    inputs = keras.Input((4, 5, 5))
    x = keras.layers.BatchNormalization(axis=1)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    _randomise(model.layers[1], rng)
    folds = {id(model.layers[1]): tuple(map(tf.constant, folded_values(model.layers[1])))}
    x = rng.normal(size=(3, 4, 5, 5)).astype("float32")
    np.testing.assert_allclose(run_folded(model, x, folds), model(x, training=False),
                               rtol=1e-4, atol=1e-5)


def test_a_subclassed_normalisation_or_model_is_called_as_it_is():
    """A subclass's own `call` might do more: it is never folded or bypassed."""

    class Shifted(keras.layers.BatchNormalization):
        def call(self, inputs, training=None, mask=None):
            return super().call(inputs, training=training) + 1.0

    class Doubling(keras.Model):
        def call(self, inputs, training=None, mask=None):
            return 2.0 * super().call(inputs, training=training)

    rng = np.random.default_rng(5)
    inner_in = keras.Input((3,))
    inner = Doubling(inner_in, keras.layers.BatchNormalization()(inner_in))
    inputs = keras.Input((3,))
    outputs = inner(Shifted()(inputs))
    model = keras.Model(inputs, outputs)
    assert foldable_batch_norms(model) == []
    packed = PackedWeights(model)
    function = tf.function(packed, input_signature=[tf.TensorSpec([None, 3])],
                           autograph=False).get_concrete_function()
    x = rng.normal(size=(4, 3)).astype("float32")
    np.testing.assert_allclose(function(tf.constant(x)), model(x, training=False),
                               rtol=1e-5, atol=1e-5)

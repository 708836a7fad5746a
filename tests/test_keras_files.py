import json
import zipfile

import keras
import numpy as np
import pytest
from keras.src.layers.layer import Layer

from tftransfer.keras_files import load_model, prime_skipsets, save_model


def _model():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              keras.layers.BatchNormalization()], name="inner")
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2)(inner(inputs))
    model = keras.Model(inputs, outputs)
    model.compile("adam", "mse")
    return model


def test_saving_makes_no_throwaway_layer_per_layer(tmp_path, monkeypatch):
    """Keras' saving builds a bare `Layer` for each layer it walks unless its
    skip sets are cached under the key it reads (`prime_skipsets`)."""
    model = _model()
    made = []
    init = Layer.__init__

    def counting(self, *args, **kwargs):
        if type(self) is Layer:
            made.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(Layer, "__init__", counting)
    keras.backend.clear_session()  # Empties Keras' global state, any cache with it.
    prime_skipsets()
    made.clear()
    model.save(tmp_path / "model.keras")
    # Unprimed, Keras 3.15 makes 6 here, one per Layer, Functional or Sequential walked.
    assert made == []


def test_the_file_is_keras_own(tmp_path):
    model = _model()
    model.save(tmp_path / "plain.keras")
    save_model(model, str(tmp_path / "primed.keras"))

    def contents(path):
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))

    assert contents(tmp_path / "primed.keras") == contents(tmp_path / "plain.keras")
    loaded = load_model(str(tmp_path / "primed.keras"), compile=False)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    for mine, theirs in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


def test_saving_deep_copies_no_config_and_restores_keras(tmp_path, monkeypatch):
    """A nested model's config is deep-copied again at each level above it;
    `save_model` copies none, and leaves Keras copying as before."""
    import copy

    from keras.src.models import functional, sequential

    model = _model()
    copied = []
    deepcopy = copy.deepcopy

    def counting(value, memo=None):
        copied.append(value)
        return deepcopy(value, memo)

    monkeypatch.setattr(copy, "deepcopy", counting)
    model.save(tmp_path / "plain.keras")
    assert len(copied) >= 2  # The outer model's config and the inner one's.
    copied.clear()
    save_model(model, str(tmp_path / "mine.keras"))
    assert copied == []
    assert functional.copy is copy and sequential.copy is copy
    model.save(tmp_path / "again.keras")
    assert len(copied) >= 2  # Outside a save, Keras copies again.


def test_a_failed_save_restores_keras_copying(tmp_path):
    import copy

    from keras.src.models import functional

    model = _model()
    with pytest.raises(ValueError):
        save_model(model, str(tmp_path / "model.txt"))  # Not a .keras name.
    assert functional.copy is copy

"""`.keras` files saved and loaded without a Keras 3 slowdown.

Keras' saving walks every layer's attributes, skipping those a bare object
of the layer's kind has (`saving_lib.get_attr_skipset`). It means to cache
that set per kind, but stores it under `saving_attr_skipset_<kind>` and looks
it up under `saving_attr_skiplist_<kind>` (Keras 3.15), so it builds a
throwaway `Layer` for each layer it saves or loads: 0.7 s of 2.7 s for the
fused MobileNet 0.75 + MobileNetV2 0.35 classifier's `model.save` (cProfile,
265 layers). `prime_skipsets` stores each set under the key Keras reads:
the same sets, computed once. Should Keras mend the key, it is a no-op.
"""

from __future__ import annotations

import keras

# The kinds of object a classifier's file holds (`KerasSaveable._obj_type`).
_KINDS = ("Layer", "Functional", "Sequential", "Operation", "Optimizer",
          "Metric", "Loss")


def prime_skipsets() -> None:
    """Caches Keras' per-kind attribute skip sets where its saving reads them.

    Keras keeps them in its thread-local global state, which
    `keras.backend.clear_session` empties: call this before each save or load.
    """
    try:
        from keras.src.backend.common import global_state
        from keras.src.saving.saving_lib import get_attr_skipset
    except ImportError:  # A Keras laid out otherwise: save as it does.
        return
    for kind in _KINDS:
        key = f"saving_attr_skiplist_{kind}"
        if global_state.get_global_attribute(key) is None:
            global_state.set_global_attribute(key, get_attr_skipset(kind))


def save_model(model: keras.Model, path: str) -> None:
    """`model.save(path)`, with the skip sets cached (`prime_skipsets`)."""
    prime_skipsets()
    model.save(path)


def load_model(path: str, **options) -> keras.Model:
    """`keras.saving.load_model(path, **options)`, with the skip sets cached."""
    prime_skipsets()
    return keras.saving.load_model(path, **options)

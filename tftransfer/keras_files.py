"""`.keras` files saved and loaded without a Keras 3 slowdown.

Keras' saving walks every layer's attributes, skipping those a bare object
of the layer's kind has (`saving_lib.get_attr_skipset`). It means to cache
that set per kind, but stores it under `saving_attr_skipset_<kind>` and looks
it up under `saving_attr_skiplist_<kind>` (Keras 3.15), so it builds a
throwaway `Layer` for each layer it saves or loads: 0.7 s of 2.7 s for the
fused MobileNet 0.75 + MobileNetV2 0.35 classifier's `model.save` (cProfile,
265 layers). `prime_skipsets` stores each set under the key Keras reads:
the same sets, computed once. Should Keras mend the key, it is a no-op.

Keras' `Functional.get_config` also returns a deep copy of its config, and a
nested model's config is copied again at each level above it: a fused
classifier nests its backbones' networks four deep, so each is copied four
times (0.8 s of 2.4 s profiled for the fused `model.save`). Saving needs no
copy at all, since `serialize_keras_object` rebuilds each list and dict of a
config it is given, so `save_model` skips them (`_configs_uncopied`).
"""

from __future__ import annotations

import contextlib
import copy
import threading
import types

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


_uncopied = threading.RLock()


@contextlib.contextmanager
def _configs_uncopied():
    """Within it, `Functional` and `Sequential.get_config` copy nothing.

    Keras' model modules read `copy.deepcopy` through their module global
    `copy`, which this swaps for a namespace whose `deepcopy` returns its
    argument, and restores after. Only for saving, whose serialization copies
    each container anyway; the lock keeps two saves from restoring out of turn.
    """
    try:
        from keras.src.models import functional, sequential
    except ImportError:  # A Keras laid out otherwise: copy as it does.
        yield
        return
    modules = (functional, sequential)
    with _uncopied:
        originals = [module.copy for module in modules]
        uncopied = types.SimpleNamespace(**vars(copy))  # `copy`, but for:
        uncopied.deepcopy = lambda value, memo=None: value
        for module in modules:
            module.copy = uncopied
        try:
            yield
        finally:
            for module, original in zip(modules, originals):
                module.copy = original


def save_model(model: keras.Model, path: str) -> None:
    """`model.save(path)`, with the skip sets cached (`prime_skipsets`) and
    no configs deep-copied (`_configs_uncopied`)."""
    prime_skipsets()
    with _configs_uncopied():
        model.save(path)


def load_model(path: str, **options) -> keras.Model:
    """`keras.saving.load_model(path, **options)`, with the skip sets cached."""
    prime_skipsets()
    return keras.saving.load_model(path, **options)

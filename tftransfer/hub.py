"""TF-Hub and SavedModel backbones under Keras 3, and publishing your own.

`hub.KerasLayer` does not work with Keras 3 (tensorflow#65419, tensorflow/hub#920).
`HubFeatureExtractor` loads a TF2 reusable SavedModel (TF-Hub, Kaggle Models or a
local folder) into a Keras 3 layer built on `keras.layers.TFSMLayer`, which shares
the module's variables with Keras, so that fine-tuning updates them and exports
carry them. `export_backbone` writes a trained backbone in the same format, so a
team can reuse it as `hub:PATH`.
"""

from __future__ import annotations

import os
import re

import keras
import tensorflow as tf

from tftransfer.errors import TransferError, WeightsUnavailableError

CLASSIFIER_OUTPUTS = (1000, 1001)  # ImageNet classification modules' logits.


def resolve_handle(handle: str) -> str:
    """The local folder of a TF-Hub / Kaggle Models handle or of a local path.

    URLs are downloaded and cached by `tensorflow_hub.resolve` (in
    `$TFHUB_CACHE_DIR`, else a temporary folder).

    Raises:
        WeightsUnavailableError: the module cannot be fetched (offline, or an
            unknown handle).
    """
    if os.path.isdir(handle):
        return os.path.abspath(handle)
    if "://" not in handle:
        raise TransferError(
            f"Hub module not found: {handle!r} is neither a folder nor a URL. Give "
            "hub:https://... (TF-Hub or Kaggle Models) or hub:/path/to/savedmodel."
        )
    try:
        import tensorflow_hub as hub
    except ImportError:
        raise TransferError(
            "Backbones from URLs need tensorflow-hub: pip install tensorflow-hub"
        ) from None
    try:
        return hub.resolve(handle)
    except Exception as error:  # tensorflow_hub raises a variety of errors here.
        cache = os.environ.get("TFHUB_CACHE_DIR", "a temporary folder (unset)")
        raise WeightsUnavailableError(
            f"The hub module {handle} could not be fetched ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}).\n"
            f"Modules are cached in TFHUB_CACHE_DIR (now: {cache}). To fix it, "
            "either:\n"
            "  - check the handle and your network access,\n"
            "  - or download the module on a machine with network access, unpack "
            "it, and pass --backbone hub:/path/to/the/folder."
        ) from None


def _accepts_training(function) -> bool:
    concrete = getattr(function, "concrete_functions", None) or []
    for fn in concrete:
        args, kwargs = fn.structured_input_signature
        if "training" in kwargs or len(args) > 1:
            return True
    return False


@keras.saving.register_keras_serializable(package="tftransfer")
class HubFeatureExtractor(keras.layers.TFSMLayer):
    """A TF2 reusable SavedModel's `__call__` as a Keras 3 layer.

    It passes `training` when the module's `__call__` takes it (and only while
    the layer is trainable), exposes the module's trainable variables when
    `trainable=True` (so fine-tuning updates them), and adds the module's
    `regularization_losses` when called with `training=True` while trainable.
    Hub image modules take float32 images in [0, 1]; `load_hub_backbone` wraps
    this layer into a backbone that takes pixels in 0..255.

    A model holding this layer runs an external SavedModel's graph, so Keras
    loads it only with `keras.saving.load_model(..., safe_mode=False)`.

    Args:
        handle: A TF-Hub / Kaggle Models URL (downloaded and cached by
            `tensorflow_hub`) or a local SavedModel folder.
        trainable: Whether fine-tuning updates the module's variables.
            Defaults to `False`.
        name: The layer's name. Defaults to `"hub"`.
        **kwargs: Passed to `keras.layers.TFSMLayer` (e.g. `dtype`).

    Raises:
        TransferError: if `handle` is neither a folder nor a URL, if a URL is
            given and `tensorflow_hub` is not installed, or if the SavedModel
            has no `__call__` (it is not a TF2 reusable SavedModel).
        WeightsUnavailableError: if a URL cannot be fetched (offline, or an
            unknown handle).

    Example:

    >>> import os, tempfile, numpy as np, tftransfer
    >>> from tftransfer.hub import HubFeatureExtractor, export_backbone
    >>> backbone = tftransfer.load_backbone("vgg16", weights=None, image_size=32)
    >>> path = export_backbone(backbone, os.path.join(tempfile.mkdtemp(), "vgg16"))
    >>> layer = HubFeatureExtractor(path)
    >>> layer(np.zeros((2, 32, 32, 3), "float32")).shape
    TensorShape([2, 512])
    >>> layer.trainable, len(layer.trainable_weights)
    (False, 0)

    From TF-Hub (needs network access the first time):

    >>> layer = HubFeatureExtractor(  # doctest: +SKIP
    ...     "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"
    ... )
    """

    def __init__(self, handle: str, trainable: bool = False, name: str = "hub",
                 **kwargs):
        kwargs.pop("filepath", None)
        kwargs.pop("call_endpoint", None)
        kwargs.pop("call_training_endpoint", None)
        path = resolve_handle(handle)
        try:
            super().__init__(path, call_endpoint="__call__", trainable=trainable,
                             name=name, **kwargs)
        except ValueError:
            raise TransferError(
                f"The SavedModel at {handle} has no __call__: it is not a TF2 "
                "reusable SavedModel (TF-Hub format). Expected __call__(images, "
                "training) returning feature vectors."
            ) from None
        self.handle = handle
        self._accepts_training = _accepts_training(self.call_endpoint_fn)
        self._regularization_losses = list(
            getattr(self._reloaded_obj, "regularization_losses", []) or []
        )

    def _add_existing_weight(self, weight):
        # TFSMLayer names the Keras variable after the TF one with only "/"
        # replaced; the ":0" left in it breaks the optimizer's slot-variable name
        # scopes ("'Variable:0_momentum' is not a valid scope name"), so no
        # reloaded module could be fine-tuned. Same variable, sanitized name.
        variable = keras.Variable(
            initializer=weight,
            trainable=weight.trainable,
            dtype=weight.dtype,
            shape=weight.shape,
            name=re.sub(r"[^A-Za-z0-9_.\-]", "_", weight.name.split(":")[0]),
        )
        self._track_variable(variable)

    def call(self, inputs, training=False):
        training = bool(training) and self.trainable
        if self._accepts_training:
            outputs = self.call_endpoint_fn(inputs, training=training)
        else:
            outputs = self.call_endpoint_fn(inputs)
        if training and self._regularization_losses:
            self.add_loss(tf.add_n([loss() for loss in self._regularization_losses]))
        return outputs

    def get_config(self):
        config = super().get_config()
        for name in ("filepath", "call_endpoint", "call_training_endpoint"):
            config.pop(name, None)
        return {**config, "handle": self.handle}

    @classmethod
    def from_config(cls, config, custom_objects=None, safe_mode=None):
        # Keras refuses to load a TFSMLayer in safe mode, as it runs the graph
        # of an external SavedModel; keep that guard.
        safe = safe_mode if safe_mode is not None else (
            keras.src.saving.serialization_lib.in_safe_mode())
        if safe is not False:
            raise ValueError(
                "This model holds a hub backbone, which loads an external "
                f"SavedModel ({config.get('handle')}). Keras forbids that in safe "
                "mode: pass safe_mode=False to keras.saving.load_model if you "
                "trust it."
            )
        return cls(**config)


def load_hub_backbone(handle: str, image_size: int = 224) -> keras.Model:
    """A frozen backbone model (pixels 0..255 in, features out) from a hub module.

    Hub image modules take float32 images in [0, 1]; the division happens inside
    the returned model, so it takes the same pixels as every tftransfer backbone.

    Raises:
        TransferError: the module is not a feature-vector module (its output is
            not `(batch, features)`, or looks like ImageNet class logits).
        WeightsUnavailableError: the module cannot be fetched.
    """
    from tftransfer.backbones import ImagePreprocessing

    layer = HubFeatureExtractor(handle)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    scaled = ImagePreprocessing("unit", name="preprocessing")(inputs)
    try:
        probe = layer(tf.zeros([1, image_size, image_size, 3]))
    except (tf.errors.OpError, TypeError, ValueError) as error:
        raise TransferError(
            f"The hub module {handle} does not take float32 images of shape "
            f"[batch, {image_size}, {image_size}, 3] in [0, 1]: "
            f"{str(error).splitlines()[0]}. Check --image-size and that it is an "
            "image feature-vector module."
        ) from None
    if isinstance(probe, dict) or len(probe.shape) != 2:
        shape = {k: v.shape for k, v in probe.items()} if isinstance(
            probe, dict) else probe.shape
        raise TransferError(
            f"The hub module {handle} returns {shape}; a backbone must return one "
            "feature vector per image, shape (batch, features). Use the module's "
            "feature_vector variant."
        )
    if probe.shape[-1] in CLASSIFIER_OUTPUTS:
        raise TransferError(
            f"The hub module {handle} returns {probe.shape[-1]} values per image: "
            "it looks like an ImageNet classification module. Use its "
            "feature_vector variant as a backbone."
        )
    features = layer(scaled)
    backbone = keras.Model(inputs, features, name="backbone")
    backbone.trainable = False
    return backbone


def hub_layer(backbone: keras.Model):
    """The `HubFeatureExtractor` inside a backbone, or `None`."""
    for layer in backbone.layers:
        if isinstance(layer, HubFeatureExtractor):
            return layer
    return None


def export_backbone(model: keras.Model, export_dir: str, overwrite: bool = False) -> str:
    """Writes a trained model's backbone as a TF2 reusable SavedModel (hub format).

    The SavedModel has `__call__(images, training=False)` taking float32 images
    in [0, 1] at the model's size and returning feature vectors, plus
    `variables`, `trainable_variables` and `regularization_losses`, so it loads
    as `hub:PATH` here and with `tensorflow_hub` elsewhere.

    The folder is written beside `export_dir` and renamed into place, so an
    interrupted export never leaves a half-written module there.

    Args:
        model: A classifier from `build_classifier`, whose layer named
            `"backbone"` is exported, or a backbone itself (any model taking
            square images of pixels in 0..255).
        export_dir: Destination folder.
        overwrite: Replace an existing `export_dir`. Defaults to `False`.

    Returns:
        `export_dir`, made absolute.

    Raises:
        FileExistsError: if `export_dir` exists and `overwrite` is `False`.

    Example:

    >>> import os, tempfile, numpy as np, tensorflow as tf, tftransfer
    >>> from tftransfer.hub import export_backbone
    >>> backbone = tftransfer.load_backbone("vgg16", weights=None, image_size=32)
    >>> model = tftransfer.build_classifier(backbone, num_classes=3)
    >>> path = export_backbone(model, os.path.join(tempfile.mkdtemp(), "vgg16"))
    >>> module = tf.saved_model.load(path)
    >>> module(np.zeros((2, 32, 32, 3), "float32"), training=False).shape
    TensorShape([2, 512])

    It is then a backbone like any other, by its path:

    >>> tftransfer.load_backbone("hub:" + path, image_size=32).output_shape
    (None, 512)
    """
    from tftransfer.export import check_destination
    from tftransfer.files import replace_atomically

    export_dir = os.path.abspath(os.fspath(export_dir))
    check_destination(export_dir, overwrite)
    backbone = model.get_layer("backbone") if any(
        layer.name == "backbone" for layer in model.layers) else model
    image_size = backbone.input_shape[1]
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)

    @tf.function(autograph=False)
    def call(images, training=False):
        return backbone(images * 255.0, training=training)

    # tf.train.Checkpoint takes any attribute, as the format wants (a
    # tf.Module's `variables` is a read-only property).
    module = tf.train.Checkpoint()
    module.variables = list(backbone.variables)
    # What a fine-tuner may update: the weights that are trainable once the
    # backbone is unfrozen (not BatchNorm statistics), whatever it is now.
    frozen = backbone.trainable
    backbone.trainable = True
    module.trainable_variables = list(backbone.trainable_variables)
    backbone.trainable = frozen
    module.regularization_losses = []
    module.__call__ = call
    call.get_concrete_function(spec, False)
    call.get_concrete_function(spec, True)
    replace_atomically(export_dir, lambda tmp: tf.saved_model.save(module, tmp))
    return export_dir

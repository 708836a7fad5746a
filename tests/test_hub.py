"""hub: backbones, built here with plain TensorFlow in the TF-Hub format."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import last_json

from tftransfer import (
    build_classifier,
    export_saved_model,
    fine_tune,
    image_folder_datasets,
    load_backbone,
)
from tftransfer.cli import main
from tftransfer.errors import TransferError
from tftransfer.hub import HubFeatureExtractor, hub_layer


class _ColorFeatures(tf.Module):
    """A tiny image feature-vector module: channel means and a random conv."""

    def __init__(self, outputs=16):
        super().__init__()
        rng = np.random.default_rng(0)
        self.kernel = tf.Variable(rng.normal(0, 0.5, (3, 3, 3, outputs)), dtype=tf.float32)
        self.bias = tf.Variable(tf.zeros([outputs]))
        self.regularization_losses = [
            tf.function(lambda: 1e-4 * tf.reduce_sum(self.kernel**2), input_signature=[])
        ]

    def features(self, images):
        conv = tf.nn.relu(tf.nn.conv2d(images, self.kernel, 1, "SAME") + self.bias)
        return tf.concat([tf.reduce_mean(images, [1, 2]),
                          tf.reduce_mean(conv, [1, 2])], axis=-1)


def write_hub_module(path, training_argument=True, outputs=16):
    module = _ColorFeatures(outputs)
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    if training_argument:
        @tf.function
        def call(images, training=False):
            return module.features(images)

        call.get_concrete_function(spec, False)
        call.get_concrete_function(spec, True)
    else:
        call = tf.function(module.features, input_signature=[spec])
    module.__call__ = call
    tf.saved_model.save(module, str(path))
    return str(path)


@pytest.mark.parametrize("training_argument", [True, False])
def test_hub_module_trains_fine_tunes_and_exports(scenes_dir, tmp_path,
                                                  training_argument):
    path = write_hub_module(tmp_path / "module", training_argument)
    backbone = load_backbone(f"hub:{path}", image_size=32)
    layer = hub_layer(backbone)
    assert layer._accepts_training == training_argument
    assert not backbone.trainable_weights
    model = build_classifier(backbone, num_classes=3)
    data = image_folder_datasets(scenes_dir, image_size=32, batch_size=8)
    history = fine_tune(model, data.train, data.validation, epochs=20,
                        learning_rate=0.02, verbose=0)
    assert history.history["val_accuracy"][-1] >= 0.85

    kernel = layer.weights[0].numpy().copy()
    fine_tune(model, data.train, data.validation, epochs=0, fine_tune_epochs=1,
              learning_rate=0.1, verbose=0)
    assert not np.array_equal(kernel, layer.weights[0].numpy())
    assert layer._reloaded_obj.kernel.numpy().tolist() == layer.weights[0].numpy(
    ).tolist()  # the module's own variable is the one trained

    export = export_saved_model(model, str(tmp_path / "export"),
                                ["desert", "forest", "ocean"])
    served = tf.saved_model.load(export)
    image = os.path.join(scenes_dir, "forest", "forest_002.jpg")
    contents = tf.constant([open(image, "rb").read()])
    out = served.signatures["serving_default"](image_bytes=contents)
    from tftransfer.data import decode_image

    expected = tf.nn.softmax(model(decode_image(contents[0], 32)[None]))
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
    # The module reads its variables itself, outside Keras: they cannot be
    # packed (`tftransfer.packing`), so the export saves each on its own.
    assert len(served.variables) == len(model.variables)


def test_export_backbone_round_trip_through_the_cli(trained_run, scenes_dir,
                                                    tmp_path, capsys):
    exported = str(tmp_path / "published")
    assert main(["export-backbone", trained_run, exported, "--json"]) == 0
    assert last_json(capsys.readouterr().out)["backbone"] == exported
    module = tf.saved_model.load(exported)
    assert module.trainable_variables and module.variables
    assert module.regularization_losses == [] or not module.regularization_losses
    images = tf.random.uniform([2, 32, 32, 3])
    original = keras.saving.load_model(os.path.join(trained_run, "model.keras"))
    np.testing.assert_allclose(module(images, training=False),
                               original.get_layer("backbone")(images * 255.0),
                               rtol=1e-4, atol=1e-4)

    args = ["train", scenes_dir, "--backbone", f"hub:{exported}", "--image-size",
            "32", "--epochs", "15", "--learning-rate", "0.01", "--json"]
    assert main([*args, "--output", str(tmp_path / "reuse")]) == 0
    first = last_json(capsys.readouterr().out)
    assert first["val_accuracy"] >= 0.9
    assert main([*args, "--output", str(tmp_path / "again")]) == 0
    assert last_json(capsys.readouterr().out)["features"]["computed"] == 0

    # A model whose backbone is a hub module runs an external graph: Keras'
    # safe mode refuses it, and so does export-backbone unless told otherwise.
    again = str(tmp_path / "again-exported")
    assert main(["export-backbone", str(tmp_path / "again"), again]) == 2
    assert "--unsafe-deserialization" in capsys.readouterr().err
    assert not os.path.exists(again)
    assert main(["export-backbone", str(tmp_path / "again"), again,
                 "--unsafe-deserialization"]) == 0
    assert tf.saved_model.load(again).trainable_variables


def test_unusable_modules_get_clear_errors(tmp_path):
    classifier = write_hub_module(tmp_path / "classifier", outputs=998)
    with pytest.raises(TransferError, match="classification module"):
        load_backbone(f"hub:{classifier}", image_size=32)

    class Signatures(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4])])
        def serve(self, x):
            return {"y": x}

    plain = Signatures()
    tf.saved_model.save(plain, str(tmp_path / "plain"),
                        signatures={"serving_default": plain.serve})
    with pytest.raises(TransferError, match="reusable SavedModel"):
        HubFeatureExtractor(str(tmp_path / "plain"))
    with pytest.raises(TransferError, match="neither a folder nor a URL"):
        load_backbone("hub:no/such/folder")

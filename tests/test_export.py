import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import last_json

from tftransfer import (
    build_classifier,
    export_saved_model,
    load_backbone,
)
from tftransfer.data import decode_image


@pytest.fixture(scope="module")
def classifier():
    model = build_classifier(load_backbone("vgg16", weights=None, image_size=32), 3)
    # Random head weights large enough that probabilities differ between images.
    head = model.get_layer("head").layers[-1]
    kernel = np.random.default_rng(0).normal(0, 0.5, head.kernel.shape)
    head.kernel.assign(kernel.astype("float32"))
    return model


def _jpegs(count=4, size=40):
    rng = np.random.default_rng(1)
    return [tf.io.encode_jpeg(rng.integers(0, 255, (size, size + 8, 3), "uint8")).numpy()
            for _ in range(count)]


def test_both_signatures_match_the_in_memory_model(classifier, tmp_path):
    path = export_saved_model(classifier, str(tmp_path / "sm"), ["x", "y", "z"])
    loaded = tf.saved_model.load(path)
    images = _jpegs()
    pixels = tf.stack([decode_image(b, 32) for b in images])
    expected = tf.nn.softmax(classifier(pixels, training=False)).numpy()
    from_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant(images))
    np.testing.assert_allclose(from_bytes["probabilities"], expected, atol=1e-4)
    from_pixels = loaded.signatures["serve_pixels"](images=pixels)
    np.testing.assert_allclose(from_pixels["probabilities"], expected, atol=1e-4)
    ids = expected.argmax(-1)
    np.testing.assert_array_equal(from_bytes["class_ids"], ids)
    names = [n.decode() for n in from_bytes["class_names"].numpy()]
    assert names == [["x", "y", "z"][i] for i in ids]
    assert open(os.path.join(path, "assets", "labels.txt")).read() == "x\ny\nz\n"


def test_saved_model_serves_with_tensorflow_alone(classifier, tmp_path):
    path = export_saved_model(classifier, str(tmp_path / "sm"), ["x", "y", "z"])
    image = tmp_path / "image.jpg"
    image.write_bytes(_jpegs(1)[0])
    script = (
        "import json, sys, tensorflow as tf\n"
        f"model = tf.saved_model.load({path!r})\n"
        f"data = open({str(image)!r}, 'rb').read()\n"
        "out = model.signatures['serving_default'](image_bytes=tf.constant([data]))\n"
        "assert 'tftransfer' not in sys.modules and 'keras' not in str(type(model))\n"
        "print(json.dumps(out['probabilities'].numpy().tolist()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    served = np.array(last_json(result.stdout))
    pixels = decode_image(tf.constant(image.read_bytes()), 32)[None]
    expected = tf.nn.softmax(classifier(pixels, training=False)).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-4)


def test_existing_export_is_kept_unless_overwrite(classifier, tmp_path):
    path = str(tmp_path / "sm")
    os.makedirs(path)
    (tmp_path / "sm" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_saved_model(classifier, path, ["x", "y", "z"])
    assert os.listdir(path) == ["mine.txt"]
    export_saved_model(classifier, path, ["x", "y", "z"], overwrite=True)
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert [n for n in os.listdir(tmp_path) if n != "sm"] == []  # no leftovers

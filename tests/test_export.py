import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from bombs import bmp_bomb, gif_bomb, jpeg_bomb, png_bomb, webp_bomb
from conftest import counting_model, last_json

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
    # The small weights are packed (`tftransfer.packing`): fewer variables
    # than the model's, holding each of its values once, all in the checkpoint.
    assert len(loaded.variables) < len(classifier.variables)
    served = np.concatenate([np.ravel(v.numpy()) for v in loaded.variables])
    own = np.concatenate([np.ravel(v.numpy()) for v in classifier.variables])
    np.testing.assert_array_equal(np.sort(served), np.sort(own))
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    saved = [key for key in reader.get_variable_to_shape_map()
             if key.endswith("VARIABLE_VALUE") and not key.startswith("save_counter")]
    assert len(saved) == len(loaded.variables)


def test_the_export_traces_the_model_once(tmp_path):
    """Both signatures share one trace of the model, and saving adds none
    (a trace inside `tf.saved_model.save` would not reuse one made before)."""
    model = counting_model()
    path = export_saved_model(model, str(tmp_path / "sm"), ["x", "y"])
    assert model.get_layer("counting").traces == 1
    loaded = tf.saved_model.load(path)
    pixels = tf.random.uniform([2, 40, 48, 3], 0, 255, seed=0)
    np.testing.assert_allclose(  # Also callable as an attribute.
        loaded.serve_pixels(pixels)["probabilities"],
        loaded.signatures["serve_pixels"](images=pixels)["probabilities"], atol=1e-6)


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


def test_serving_refuses_decompression_bombs_before_decoding(classifier, tmp_path):
    """Each bomb declares 400 million pixels (TensorFlow alone decodes the PNG
    or the GIF to 1.2 GB of pixels); the exported signature refuses each by
    its header, in a process that imports only TensorFlow and stays under
    1 GiB. Bytes that are no image are refused too; an empty batch is served."""
    path = export_saved_model(classifier, str(tmp_path / "sm"), ["x", "y", "z"])
    bombs = {"png": png_bomb(), "jpeg": jpeg_bomb(), "gif": gif_bomb(),
             "gif_frame_beyond_canvas": gif_bomb(screen=16), "bmp": bmp_bomb(),
             "webp": webp_bomb()}
    files = {**bombs, "garbage": b"not an image at all", "image": _jpegs(1)[0]}
    for name, contents in files.items():
        (tmp_path / name).write_bytes(contents)
    script = textwrap.dedent(f"""
        import json, sys, tensorflow as tf
        serve = tf.saved_model.load({path!r}).signatures["serving_default"]
        results = {{}}
        for name in {list(files)!r}:
            data = open(name, "rb").read()
            try:
                results[name] = serve(image_bytes=tf.constant([data]))[
                    "probabilities"].shape.as_list()
            except tf.errors.InvalidArgumentError as error:
                results[name] = error.message
        empty = serve(image_bytes=tf.constant([], tf.string))
        results["empty"] = {{k: v.shape.as_list() for k, v in empty.items()}}
        results["tftransfer"] = "tftransfer" in sys.modules
        # VmHWM: this process's own peak. ru_maxrss would also count the
        # pytest process it was forked from (Linux keeps it across exec).
        results["peak_mib"] = next(int(line.split()[1]) / 1024
                                   for line in open("/proc/self/status")
                                   if line.startswith("VmHWM:"))
        print(json.dumps(results))
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    served = last_json(result.stdout)
    for name in bombs:
        assert "declares more than 40000000 pixels" in served[name], (name, served[name])
    assert "Unknown image file format" in served["garbage"]
    assert served["image"] == [1, 3]
    assert served["empty"] == {"probabilities": [0, 3], "class_ids": [0],
                               "class_names": [0]}
    assert not served["tftransfer"]
    assert served["peak_mib"] < 1024, served["peak_mib"]


def test_the_pixel_limit_is_the_one_set_at_export(classifier, tmp_path):
    """An image of exactly `max_pixels` is served; one row more is refused,
    whatever its format."""
    path = export_saved_model(classifier, str(tmp_path / "sm"), ["x", "y", "z"],
                              max_pixels=48 * 40)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    for encode in (tf.io.encode_png, tf.io.encode_jpeg):
        fits = encode(np.zeros((40, 48, 3), "uint8"))
        assert serve(image_bytes=tf.stack([fits]))["class_ids"].shape == (1,)
        with pytest.raises(tf.errors.InvalidArgumentError, match="more than 1920"):
            serve(image_bytes=tf.stack([fits, encode(np.zeros((41, 48, 3), "uint8"))]))


def test_a_run_exports_with_its_pixel_limit(trained_run):
    """The run records the limit its SavedModel was exported with, and the
    SavedModel refuses an image declaring more (7000x7000, 49 MP)."""
    with open(os.path.join(trained_run, "metrics.json")) as handle:
        assert json.load(handle)["serving_max_pixels"] == 40_000_000
    serve = tf.saved_model.load(os.path.join(trained_run, "saved_model")).signatures[
        "serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than 40000000"):
        serve(image_bytes=tf.constant([jpeg_bomb(7000)]))

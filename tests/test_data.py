import os
import shutil
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
import tensorflow as tf
from conftest import last_json

from tftransfer import DataError, image_folder_datasets, scan_image_folder
from tftransfer.data import make_dataset


def _write_jpeg(path, color=(200, 30, 30), size=24):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.full((size, size, 3), color, "uint8")
    pixels[: size // 2] = np.random.default_rng(len(path)).integers(0, 255, 3)
    tf.io.write_file(path, tf.io.encode_jpeg(pixels))


def _class_folder(root, classes=("a", "b"), count=10):
    for index, name in enumerate(classes):
        for i in range(count):
            color = (40 * index + i, 100, 200 - 10 * index)
            _write_jpeg(os.path.join(root, name, f"{name}{i}.jpg"), color)
    return str(root)


def test_class_folders_are_split_stably_by_content(tmp_path):
    root = _class_folder(tmp_path / "data", count=20)
    first = scan_image_folder(root, validation_split=0.3, seed=3)
    assert first.layout == "classes" and first.class_names == ["a", "b"]
    splits = {f.path: f.split for f in first.files}
    assert set(splits.values()) == {"train", "validation"}
    # Adding images never moves the existing ones between splits.
    _write_jpeg(os.path.join(root, "a", "new.jpg"), (1, 2, 3))
    _write_jpeg(os.path.join(root, "b", "new.jpg"), (3, 2, 1))
    second = scan_image_folder(root, validation_split=0.3, seed=3)
    for f in second.files:
        if f.path in splits:
            assert f.split == splits[f.path]
    other_seed = scan_image_folder(root, validation_split=0.3, seed=4)
    assert {f.path: f.split for f in other_seed.files} != {
        f.path: f.split for f in second.files}


def test_split_folders_are_used_as_given(tmp_path):
    root = tmp_path / "data"
    _class_folder(root / "train")
    _class_folder(root / "val", count=3)
    _class_folder(root / "test", count=2)
    folder = scan_image_folder(str(root))
    assert folder.layout == "splits"
    assert folder.counts() == {"train": {"a": 10, "b": 10},
                               "validation": {"a": 3, "b": 3},
                               "test": {"a": 2, "b": 2}}


def _under(path, folder):
    return os.path.commonpath([path, str(folder)]) == str(folder)


def test_train_and_test_folders_carve_validation_from_train(tmp_path):
    root = tmp_path / "data"
    _class_folder(root / "train", count=20)
    _class_folder(root / "test", count=3)
    folder = scan_image_folder(str(root), validation_split=0.3, seed=5)
    assert folder.layout == "train_test"
    assert folder.class_names == ["a", "b"]  # not ["test", "train"]
    test = {f.path for f in folder.used("test")}
    assert test == {str(p) for p in (root / "test").rglob("*.jpg")}
    train = {f.path for f in folder.used("train")}
    validation = {f.path for f in folder.used("validation")}
    assert train and validation and not train & validation
    assert train | validation == {str(p) for p in (root / "train").rglob("*.jpg")}
    assert all(_under(p, root / "train") for p in validation)
    assert set(folder.counts()["validation"]) == {"a", "b"}
    # The same content hash as when train/'s class folders are scanned directly.
    direct = scan_image_folder(str(root / "train"), validation_split=0.3, seed=5)
    assert {f.path: f.split for f in direct.files} == {
        f.path: f.split for f in folder.files if f.split != "test"}
    assert len(folder.notes) == 1
    note = folder.notes[0]
    assert "carved from train/" in note and "validation_split=0.3" in note
    assert "seed=5" in note and "test/ is the test split" in note
    data = image_folder_datasets(str(root), image_size=16, folder=folder)
    assert sum(int(y.shape[0]) for _, y in data.test) == 6
    # Unsplit for evaluation: test/ stays the test split, train/ is left alone.
    unsplit = scan_image_folder(str(root), validation_split=None)
    assert {f.split for f in unsplit.files} == {"", "test"}
    assert {f.path for f in unsplit.used("test")} == test


def test_train_folder_alone_carves_validation_from_it(tmp_path):
    root = tmp_path / "data"
    _class_folder(root / "train", count=20)
    folder = scan_image_folder(str(root), validation_split=0.3)
    assert folder.layout == "train_only" and folder.class_names == ["a", "b"]
    assert set(folder.counts()) == {"train", "validation"}
    assert "carved from train/" in folder.notes[0]
    assert "test" not in folder.notes[0]


def test_split_folders_without_train_are_an_error(tmp_path):
    only_val = tmp_path / "only_val"
    _class_folder(only_val / "val")
    _class_folder(only_val / "test")
    with pytest.raises(DataError, match=r"test/, val/ but no train/ folder\. "
                                        r"Expected train/"):
        scan_image_folder(str(only_val))
    mismatch = tmp_path / "mismatch"
    _class_folder(mismatch / "train")
    _class_folder(mismatch / "test", classes=("a", "c"))
    with pytest.raises(DataError, match="same class folders"):
        scan_image_folder(str(mismatch))


def test_given_splits_and_class_folders_have_no_notes(tmp_path):
    root = tmp_path / "data"
    _class_folder(root / "train")
    _class_folder(root / "validation", count=3)
    assert scan_image_folder(str(root)).notes == []
    # Contents vary with the path's length: at 0.5, 20 images all land in
    # train with odds of 1e-6 (at 0.2 it was 1%, and happened).
    classes = _class_folder(tmp_path / "classes")
    assert scan_image_folder(classes, validation_split=0.5).notes == []


def test_clear_errors_for_unusable_folders(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No class folders"):
        scan_image_folder(str(tmp_path / "empty"))
    one = _class_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(DataError, match="one class"):
        scan_image_folder(one)
    root = _class_folder(tmp_path / "data")
    os.makedirs(os.path.join(root, "ghosts"))
    with open(os.path.join(root, "ghosts", "notes.txt"), "w") as handle:
        handle.write("no image here")
    with pytest.raises(DataError, match="'ghosts'"):
        scan_image_folder(root)
    mismatch = tmp_path / "mismatch"
    _class_folder(mismatch / "train")
    _class_folder(mismatch / "val", classes=("a", "c"))
    with pytest.raises(DataError, match="same class folders"):
        scan_image_folder(str(mismatch))


def test_broken_files_are_skipped_with_reasons(tmp_path):
    root = _class_folder(tmp_path / "data")
    good = os.path.join(root, "a", "a0.jpg")
    contents = open(good, "rb").read()
    broken = {
        "empty.jpg": b"",
        "notes.jpg": b"this is text, not an image",
        "truncated.jpg": contents[: len(contents) // 3],
        "scan.tif": b"II*\x00" + b"\x00" * 64,
    }
    for name, data in broken.items():
        with open(os.path.join(root, "a", name), "wb") as handle:
            handle.write(data)
    os.symlink(os.path.join(root, "nowhere.jpg"), os.path.join(root, "b", "link.jpg"))
    shutil.copy(good, os.path.join(root, "b", "JPEG NAMED.PNG"))
    open(os.path.join(root, "a", ".DS_Store"), "w").close()
    folder = scan_image_folder(root)
    by_name = {os.path.basename(f.path): f for f in folder.files}
    assert ".DS_Store" not in by_name
    assert by_name["empty.jpg"].reason == "empty file"
    assert by_name["notes.jpg"].reason == "not an image"
    assert by_name["truncated.jpg"].reason.startswith("truncated or corrupt jpeg")
    assert by_name["scan.tif"].reason == "unsupported format (tiff)"
    assert by_name["link.jpg"].reason == "dangling link"
    assert by_name["JPEG NAMED.PNG"].status == "used"
    assert all(by_name[n].status == "skipped" for n in [*broken, "link.jpg"])


def test_pipelines_yield_resized_float_pixels_and_labels(tmp_path):
    root = _class_folder(tmp_path / "data")
    data = image_folder_datasets(root, image_size=16, batch_size=4)
    pixels, labels = next(iter(data.validation))
    assert pixels.shape[1:] == (16, 16, 3) and pixels.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(pixels)) and float(tf.reduce_max(pixels)) <= 255.0
    total = sum(int(y.shape[0]) for _, y in data.train) + sum(
        int(y.shape[0]) for _, y in data.validation)
    assert total == 20 and data.test is None


def test_random_bytes_never_crash_the_scan(tmp_path):
    root = _class_folder(tmp_path / "data", count=10)
    rng = np.random.default_rng(0)
    good = open(os.path.join(root, "a", "a0.jpg"), "rb").read()
    prefixes = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM",
                b"RIFF\x00\x00\x00\x00WEBP", good[:200]]
    extensions = [".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".JPG"]
    for i in range(300):
        body = prefixes[i % len(prefixes)] + rng.bytes(int(rng.integers(0, 400)))
        name = f"fuzz{i}{extensions[i % len(extensions)]}"
        with open(os.path.join(root, "ab"[i % 2], name), "wb") as handle:
            handle.write(body)
    folder = scan_image_folder(root, validation_split=0.5)
    fuzz = [f for f in folder.files if os.path.basename(f.path).startswith("fuzz")]
    assert len(fuzz) == 300
    for f in fuzz:
        assert f.status in ("used", "skipped")
        assert (f.status == "skipped") == bool(f.reason)
    assert sum(f.status == "skipped" for f in fuzz) >= 290
    assert len(folder.used("train")) + len(folder.used("validation")) >= 20


def test_kept_decoded_images_are_replayed_without_reading_the_files(tmp_path):
    from tftransfer.data import make_dataset
    from tftransfer.demo import write_demo_images

    folder = write_demo_images(str(tmp_path), images_per_class=4, image_size=40)
    data = scan_image_folder(str(folder))
    paths, labels = data.paths_and_labels("train")
    copies = [shutil.copy(p, str(tmp_path / f"copy{i}.jpg")) for i, p in enumerate(paths)]
    kept = make_dataset(copies, labels, 32, batch_size=5, shuffle=True,
                        keep_decoded=True)
    plain = make_dataset(paths, labels, 32, batch_size=5)

    def sorted_pixels(dataset):
        pixels = tf.concat([x for x, _ in dataset], 0).numpy()
        return pixels[np.lexsort(pixels.reshape(len(pixels), -1).T[:50])]

    first = sorted_pixels(kept)
    np.testing.assert_array_equal(first, sorted_pixels(plain))
    for path in copies:  # The files are gone: a second epoch must not read them.
        os.remove(path)
    np.testing.assert_array_equal(sorted_pixels(kept), first)
    orders = [np.concatenate([y for _, y in kept]) for _ in range(3)]
    assert any(not np.array_equal(orders[0], o) for o in orders[1:])  # reshuffled


ODD_NAMES = ("Cat", "cat", "e\u0301t\u00e9", "\u65e5\u672c", "\u05e9\u05dc\u05d5\u05dd",
             " trailing space ", "\U0001f408 cat")


def test_odd_class_names_round_trip_exactly(tmp_path):
    """Case-distinct names, a decomposed name (NFC once read: é typed on any
    system matches it), scripts, emoji and spaces reach labels.txt, the
    served `class_names` and the LiteRT metadata exactly, and the files of
    the decomposed folder are all found."""
    import keras

    from tftransfer import ServedModel, export_saved_model
    from tftransfer.export import read_labels
    from tftransfer.tflite import read_labels as read_tflite_labels
    from tftransfer.tflite import with_labels

    folder = scan_image_folder(_class_folder(tmp_path / "data", ODD_NAMES, 4), None)
    expected = sorted(unicodedata.normalize("NFC", name) for name in ODD_NAMES)
    assert folder.class_names == expected
    assert "\u00e9t\u00e9" in folder.class_names  # composed
    assert folder.counts()[""]["\u00e9t\u00e9"] == 4
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(len(expected))])
    path = export_saved_model(model, str(tmp_path / "sm"), folder.class_names)
    assert read_labels(os.path.join(path, "assets", "labels.txt")) == expected
    served = ServedModel(path)
    assert served.class_names == expected
    outputs = tf.saved_model.load(path).signatures["serving_default"](
        image_bytes=tf.io.encode_png(np.zeros((8, 8, 3), "uint8"))[None])
    assert outputs["class_names"].numpy()[0].decode() in expected
    assert read_tflite_labels(with_labels(_tiny_tflite(model), expected)) == expected


def _tiny_tflite(model):
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


@pytest.mark.parametrize("names, match", [
    (("a\nb", "c"), r"'a\\nb'.*U\+000A \(a control character\)"),
    (("a\tb", "c"), r"'a\\tb'.*U\+0009"),
    (("a\u2028b", "c"), r"U\+2028 \(a line separator\)"),
    (("   ", "c"), r"'   '.*blank"),
    (("\u00e9", "e\u0301", "c"), r"two Unicode forms"),
], ids=["newline", "tab", "line-separator", "blank", "nfc-and-nfd"])
def test_class_names_labels_cannot_hold_are_refused_by_name(tmp_path, names, match):
    data = _class_folder(tmp_path / "data", names, 2)
    with pytest.raises(DataError, match=match) as error:
        scan_image_folder(data)
    assert "Rename" in str(error.value) or "rename" in str(error.value)


def test_a_name_that_is_not_utf8_is_refused(tmp_path):
    data = _class_folder(tmp_path / "data", ("ok", "fine"), 2)
    os.rename(os.path.join(data, "ok"), os.path.join(os.fsencode(data), b"caf\xe9"))
    with pytest.raises(DataError, match=r"caf\\udce9.*not UTF-8"):
        scan_image_folder(data)


def test_a_file_name_that_is_not_utf8_is_scanned_and_decoded(tmp_path):
    data = _class_folder(tmp_path / "data", ("ok", "fine"), 2)
    folder = os.path.join(os.fsencode(data), b"ok")
    os.rename(os.path.join(folder, b"ok0.jpg"), os.path.join(folder, b"caf\xe9.jpg"))
    scanned = scan_image_folder(data, validation_split=None)
    odd = [f for f in scanned.files if f.path.endswith("caf\udce9.jpg")]
    assert [(f.status, f.reason) for f in odd] == [("used", "")]
    (pixels, labels), = list(make_dataset([odd[0].path], np.zeros(1), image_size=8))
    assert tuple(pixels.shape) == (1, 8, 8, 3) and labels.numpy().tolist() == [0]


def test_a_link_loop_is_walked_once_and_noted(tmp_path):
    data = _class_folder(tmp_path / "data", ("a", "b"), 4)
    os.symlink(".", os.path.join(data, "a", "self"))
    os.makedirs(os.path.join(data, "b", "deeper"))
    os.symlink(os.path.join("..", ".."), os.path.join(data, "b", "deeper", "up"))
    folder = scan_image_folder(data, None)
    assert folder.counts()[""] == {"a": 4, "b": 4}  # each image once
    assert len(folder.files) == 8
    loops = [note for note in folder.notes if "loop" in note]
    assert [note.split(":")[0] for note in loops] == [
        os.path.join("a", "self"), os.path.join("b", "deeper", "up")]


def test_scanning_200000_files_stays_within_500_mib(tmp_path):
    """The scan's own memory (its process's peak less what TensorFlow and a
    first small scan took) on 200,000 one-byte files beside a few images."""
    data = _class_folder(tmp_path / "data", ("a", "b"), 3)
    for name in ("a", "b"):
        for i in range(100_000):
            with open(os.path.join(data, name, f"note{i:06d}.txt"), "wb") as handle:
                handle.write(b"x")
    small = _class_folder(tmp_path / "small", ("a", "b"), 3)
    script = (
        "import json\n"
        "from tftransfer.folders import scan_image_folder\n"
        f"scan_image_folder({small!r}, None)\n"
        # VmHWM, this process's own peak: ru_maxrss would count the pytest
        # process it was forked from too (Linux keeps it across exec).
        "def memory(field):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(field + ':'):\n"
        "            return int(line.split()[1]) / 1024\n"
        "before = memory('VmRSS')\n"
        f"folder = scan_image_folder({data!r}, None, progress=True)\n"
        "peak = memory('VmHWM')\n"
        "print(json.dumps({'skipped': len(folder.skipped()), 'used': len(folder.used('')),\n"
        "                  'before': before, 'peak': peak}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    scan = last_json(result.stdout)
    assert scan["skipped"] == 200_000 and scan["used"] == 6
    assert scan["peak"] - scan["before"] < 500, scan

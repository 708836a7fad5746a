import os
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer import load_backbone, scan_image_folder
from tftransfer.cache import (
    HEADER_SIZE,
    FeatureCache,
    cached_outputs,
    feature_cache_key,
    open_cache,
    weights_fingerprint,
)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("vgg16", weights=None, image_size=32)


def _write_jpeg(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), "uint8")
    tf.io.write_file(path, tf.io.encode_jpeg(pixels))


def _class_folder(root, count):
    for index, name in enumerate("ab"):
        for i in range(count):
            _write_jpeg(os.path.join(root, name, f"{i}.jpg"), 100 * index + i)
    return str(root)


def _files(root):
    files = [f for f in scan_image_folder(root, validation_split=None).files]
    return [f.path for f in files], [f.digest for f in files]


def _cache(directory, backbone):
    return FeatureCache(str(directory), feature_cache_key(backbone, "vgg16", 32, "caffe"))


def test_hits_equal_fresh_features_and_a_changed_file_is_recomputed_alone(
        tmp_path, backbone):
    root = _class_folder(tmp_path / "data", count=6)
    paths, digests = _files(root)
    cache = _cache(tmp_path / "cache", backbone)
    fresh, stats = cached_outputs(backbone, paths, digests, 32, None, verbose=0)
    assert stats.computed == 12 and stats.hits == 0
    first, stats = cached_outputs(backbone, paths, digests, 32, cache, verbose=0)
    assert stats == (0, 12, 0)
    np.testing.assert_array_equal(first, fresh)
    second, stats = cached_outputs(backbone, paths, digests, 32, cache, verbose=0)
    assert stats == (12, 0, 0)
    np.testing.assert_array_equal(second, fresh)

    _write_jpeg(paths[3], seed=999)  # The user edits one image.
    paths, digests = _files(root)
    third, stats = cached_outputs(backbone, paths, digests, 32, cache, verbose=0)
    assert stats == (11, 1, 0)
    assert not np.array_equal(third[3], fresh[3])
    np.testing.assert_array_equal(np.delete(third, 3, 0), np.delete(fresh, 3, 0))


def test_corrupt_entries_are_detected_and_rebuilt(tmp_path, backbone):
    root = _class_folder(tmp_path / "data", count=3)
    paths, digests = _files(root)
    cache = _cache(tmp_path / "cache", backbone)
    expected, _ = cached_outputs(backbone, paths, digests, 32, cache, verbose=0)
    truncated, flipped, garbage = (cache.path(d) for d in digests[:3])
    with open(truncated, "r+b") as handle:
        handle.truncate(HEADER_SIZE + 10)
    with open(flipped, "r+b") as handle:
        handle.seek(HEADER_SIZE + 5)
        byte = handle.read(1)
        handle.seek(HEADER_SIZE + 5)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with open(garbage, "wb") as handle:
        handle.write(b"not a cache entry")
    for digest in digests[:3]:
        assert cache.load(digest) == (None, "corrupt")
    _flip_a_byte(cache.pack_path(digests))  # The pack of all six: not used.
    assert cache.load_pack(digests) is None
    rebuilt, stats = cached_outputs(backbone, paths, digests, 32, cache, verbose=0)
    assert stats == (3, 3, 3)
    np.testing.assert_array_equal(rebuilt, expected)
    assert all(cache.load(d)[1] == "hit" for d in digests)
    np.testing.assert_array_equal(cache.load_pack(digests), expected)  # Rewritten.


def _flip_a_byte(path):
    with open(path, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_a_list_of_images_all_cached_is_read_back_as_one_pack(tmp_path, backbone):
    root = _class_folder(tmp_path / "data", count=3)
    paths, digests = _files(root)
    cache = _cache(tmp_path / "cache", backbone)
    expected, _ = cached_outputs(backbone, paths, digests, 32, cache, verbose=0)
    for digest in digests:  # Only the pack is left to read them from.
        os.remove(cache.path(digest))
    again, stats = cached_outputs(backbone, paths, digests, 32, cache, verbose=0)
    assert stats == (6, 0, 0)
    np.testing.assert_array_equal(again, expected)
    again[0] = 0  # Writable, as the entries' stack is.
    # Another list (another split, or images added) has a pack of its own.
    part, stats = cached_outputs(backbone, paths[:4], digests[:4], 32, cache,
                                 verbose=0)
    assert stats == (0, 4, 0)
    np.testing.assert_array_equal(part, expected[:4])
    assert cache.load_pack(digests[:4]) is not None


def test_no_pack_holds_the_outputs_of_a_file_changed_since_the_scan(
        tmp_path, backbone):
    root = _class_folder(tmp_path / "data", count=3)
    paths, digests = _files(root)
    cache = _cache(tmp_path / "cache", backbone)
    _write_jpeg(paths[2], seed=999)  # Edited after the scan: computed, not cached.
    _, stats = cached_outputs(backbone, paths, digests, 32, cache, verbose=0)
    assert stats == (0, 6, 0)
    assert not os.path.exists(cache.path(digests[2]))
    assert not os.path.exists(cache.pack_path(digests))


def test_the_least_recently_used_packs_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr("tftransfer.cache.MAX_PACKS", 2)
    cache = FeatureCache(str(tmp_path), {"network": "test"})
    lists = [[f"{i:064x}"] for i in range(3)]
    for age, digests in enumerate(lists[:2]):
        cache.store_pack(digests, np.full((1, 2), age, "float32"))
        os.utime(cache.pack_path(digests), (1000 + age, 1000 + age))
    # Reading the older makes it the more recently used.
    np.testing.assert_array_equal(cache.load_pack(lists[0]), [[0, 0]])
    cache.store_pack(lists[2], np.full((1, 2), 2, "float32"))
    assert [cache.load_pack(d) is not None for d in lists] == [True, False, True]


def test_key_changes_with_weights_size_and_preprocessing(backbone):
    keras.utils.set_random_seed(1)  # other random weights than the fixture's
    other = load_backbone("vgg16", weights=None, image_size=32)
    assert weights_fingerprint(other) != weights_fingerprint(backbone)
    base = feature_cache_key(backbone, "vgg16", 32, "caffe")
    assert base != feature_cache_key(backbone, "vgg16", 48, "caffe")
    assert base != feature_cache_key(backbone, "vgg16", 32, "tf")
    assert base == feature_cache_key(backbone, "vgg16", 32, "caffe")


def test_concurrent_writers_never_leave_a_bad_entry(tmp_path):
    cache = FeatureCache(str(tmp_path), {"network": "test"}, dtype="float16")
    value = np.arange(4096, dtype="float32")

    def write():
        for _ in range(50):
            cache.store("ab" * 32, value)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(200):
        array, status = cache.load("ab" * 32)
        assert status in ("hit", "miss")
        if array is not None:
            np.testing.assert_array_equal(array, value.astype("float16"))
    for thread in threads:
        thread.join()
    assert not [n for n in os.listdir(os.path.dirname(cache.path("ab" * 32)))
                if n.startswith(".tmp-")]


def test_a_killed_writers_temporary_files_are_swept(tmp_path):
    """A kill mid-write leaves `.tmp-*` beside the entries: old ones go, entries
    and a write that may still be in progress stay."""
    cache = FeatureCache(str(tmp_path), {"network": "test"})
    cache.store("cd" * 32, np.ones(3, "float32"))
    folder = os.path.dirname(cache.path("cd" * 32))
    stale = [os.path.join(folder, ".tmp-killed"), os.path.join(cache.directory,
                                                                ".tmp-probe-x")]
    fresh = os.path.join(folder, ".tmp-writing")
    for path in [*stale, fresh]:
        with open(path, "wb") as handle:
            handle.write(b"half an entry")
    hours_ago = time.time() - 2 * 3600
    for path in [*stale, cache.path("cd" * 32)]:
        os.utime(path, (hours_ago, hours_ago))
    again = FeatureCache(str(tmp_path), {"network": "test"})
    assert again.swept == 2
    assert not any(os.path.exists(path) for path in stale)
    assert os.path.exists(fresh)
    array, status = again.load("cd" * 32)
    assert status == "hit" and array.tolist() == [1.0, 1.0, 1.0]


def test_unwritable_cache_folder_warns_and_runs_without(tmp_path, capsys):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("a file where the cache folder should be")
        directory = str(blocker / "cache")
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        directory = str(tmp_path / "locked" / "cache")
    with pytest.warns(UserWarning, match="cannot be written"):
        assert open_cache(directory, {"network": "test"}) is None
    assert "--no-cache" in capsys.readouterr().out

"""An on-disk cache of what a frozen network computes for each image.

With the backbone frozen and no random augmentation, an image's features never
change, so they are computed once and kept. Entries are keyed by everything that
changes them: the network (name, a fingerprint of all its weights, where it is
cut), the image size, the preprocessing, the resize method, and the SHA-256 of the
file's content (so a renamed file is still a hit and a changed one a miss).

Layout: `CACHE_DIR/v1/<network key>/<digest[:2]>/<digest>.bin`, plus `key.json`
saying what the key stands for. Each entry is a 64-byte header (magic, dtype,
shape, BLAKE2b checksum of the payload) and the raw array. The format is our own,
not `.npy`, because `.npy` has no checksum and a cache must never hand back a
truncated or corrupt entry; a fixed header also lets `tf.data` read entries
natively (`read_file`, `substr`, `decode_raw`) when they are too big to hold.

Safety: each entry is written to a unique temporary file and renamed into place,
so two runs sharing a cache can only replace an entry with an identical one, and
a kill leaves no partial entry. A bad entry is reported as a miss and rebuilt.

Packs: once every image of a list (a split) is in the cache, `cached_outputs`
also writes their outputs as one array, `packs/<hash of the digests>.bin` (the
same format), which the next run with the same list reads in one go. Reading
flowers128's 4,311 entries one by one took 0.15-0.2 s a network with the files
in the page cache (a fusion reads one list per member), and one random read
each from a cold disk. A pack duplicates its entries: at most `MAX_PACKS`, the
most recently used, are kept per network. A bad or missing pack is passed
over for the entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import struct
import tempfile
import threading
import warnings
from typing import NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf

from tftransfer.data import RESIZE_METHOD, make_dataset
from tftransfer.errors import check_choice
from tftransfer.files import (
    TEMPORARY_PREFIX,
    sweep_temporaries,
    write_atomically,
    write_bytes_atomically,
)

FORMAT_VERSION = "v1"
HEADER_SIZE = 64
_MAGIC = b"TFTC"
_DTYPES = {"float16": 1, "float32": 2}
_DTYPE_NAMES = {code: name for name, code in _DTYPES.items()}
_MAX_DIMS = 4
PACKS_FOLDER = "packs"
MAX_PACKS = 16


def default_cache_dir() -> str:
    """Returns the feature cache folder to use when none is given.

    Returns:
        `$TFTRANSFER_CACHE_DIR` if set and not empty, else
        `$XDG_CACHE_HOME/tftransfer`, else `~/.cache/tftransfer` (with `~`
        expanded). The folder is not created.

    Example:

    >>> import os, tftransfer
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"TFTRANSFER_CACHE_DIR": "/data/cache"}):
    ...     tftransfer.default_cache_dir()
    '/data/cache'
    >>> with mock.patch.dict(os.environ, {"TFTRANSFER_CACHE_DIR": "",
    ...                                   "XDG_CACHE_HOME": "/home/me/.cache"}):
    ...     tftransfer.default_cache_dir()
    '/home/me/.cache/tftransfer'
    """
    if os.environ.get("TFTRANSFER_CACHE_DIR"):
        return os.environ["TFTRANSFER_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "tftransfer")


def weights_fingerprint(model) -> str:
    """SHA-256 over the shapes and values of all of a model's weights.

    `model` is a Keras model (its `weights` are used) or any list of variables,
    such as a loaded SavedModel's `variables`.
    """
    digest = hashlib.sha256()
    for variable in getattr(model, "weights", model):
        # Values and shapes only: variable paths depend on layer names, which
        # Keras may number differently from one process to the next.
        value = np.ascontiguousarray(variable.numpy())
        digest.update(f"{value.shape}:{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _encode(array: np.ndarray) -> bytes:
    header, payload = _encoded_parts(array)
    return header + payload


def _encoded_parts(array: np.ndarray) -> tuple:
    """`(header, payload)` of an entry: bytes, and the array's own memory
    (a memoryview, not a copy: a pack may be as big as a split's features)."""
    payload = memoryview(np.ascontiguousarray(array)).cast("B")
    checksum = hashlib.blake2b(payload, digest_size=32).digest()
    shape = list(array.shape) + [0] * (_MAX_DIMS - array.ndim)
    header = struct.pack(
        "<4sBB2x4I", _MAGIC, _DTYPES[array.dtype.name], array.ndim, *shape
    )
    return (header + checksum).ljust(HEADER_SIZE, b"\0"), payload


def _decode(contents: bytes) -> Optional[np.ndarray]:
    """The array in an entry, or `None` if it is truncated or corrupt."""
    if len(contents) < HEADER_SIZE:
        return None
    magic, dtype_code, ndim, *shape = struct.unpack("<4sBB2x4I", contents[:24])
    if magic != _MAGIC or dtype_code not in _DTYPE_NAMES or ndim > _MAX_DIMS:
        return None
    payload = contents[HEADER_SIZE:]
    if hashlib.blake2b(payload, digest_size=32).digest() != contents[24:56]:
        return None
    dtype = np.dtype(_DTYPE_NAMES[dtype_code])
    shape = tuple(shape[:ndim])
    if len(payload) != dtype.itemsize * int(np.prod(shape)):
        return None
    return np.frombuffer(payload, dtype).reshape(shape)


def cache_folder(directory: str, key: dict, dtype: str = "float32") -> str:
    """The folder `FeatureCache(directory, key, dtype)` keeps its entries in
    (not created)."""
    name = hashlib.sha256(
        json.dumps({**key, "dtype": dtype}, sort_keys=True, default=str).encode()
    ).hexdigest()[:32]
    return os.path.join(directory, FORMAT_VERSION, name)


class FeatureCache:
    """Cached outputs of one network for images, keyed by file content.

    Entries live in `directory/v1/<hash of key>/`, one file per image named by
    its content digest. Opening a cache creates its folder, writes `key.json`
    there if absent, checks the folder can be written, and removes the
    temporary files of writers that were killed.

    Args:
        directory: The cache root (see `default_cache_dir`).
        key: Everything that changes the network's output for a given file,
            as a JSON-serializable dict (see `feature_cache_key`).
        dtype: Storage dtype, `"float32"` or `"float16"`. Defaults to `"float32"`.

    Attributes:
        key: `key` plus the storage `dtype`.
        directory: This key's folder, below `directory`.
        swept: How many leftover temporary files were removed on opening.

    Raises:
        ValueError: if `dtype` is neither `"float32"` nor `"float16"`.
        OSError: if the folder cannot be created or written.

    Example:

    >>> import tempfile, numpy as np, tftransfer
    >>> cache = tftransfer.FeatureCache(tempfile.mkdtemp(), {"network": "demo"})
    >>> digest = "0f" * 32  # The SHA-256 of an image file's content.
    >>> cache.load(digest)
    (None, 'miss')
    >>> cache.store(digest, np.arange(3))
    >>> cache.load(digest)
    (array([0., 1., 2.], dtype=float32), 'hit')
    """

    def __init__(self, directory: str, key: dict, dtype: str = "float32"):
        check_choice("dtype", dtype, sorted(_DTYPES))
        self.key = {**key, "dtype": dtype}
        self.dtype = np.dtype(dtype)
        self.directory = cache_folder(directory, key, dtype)
        os.makedirs(self.directory, exist_ok=True)
        key_path = os.path.join(self.directory, "key.json")
        if not os.path.exists(key_path):
            contents = json.dumps(self.key, indent=2, default=str)
            write_atomically(key_path, lambda stream: stream.write(contents), text=True)
        # Fail now, not mid-run, when the folder cannot be written.
        handle, probe = tempfile.mkstemp(prefix=TEMPORARY_PREFIX + "probe-",
                                        dir=self.directory)
        os.close(handle)
        os.remove(probe)
        # What runs killed mid-write left behind (never read: not entries).
        self.swept = sweep_temporaries(self.directory)
        self._folders = set()  # Entry folders known to exist.

    def path(self, digest: str) -> str:
        """Returns the file of the entry for `digest` (which may not exist)."""
        return os.path.join(self.directory, digest[:2], digest + ".bin")

    def load(self, digest: str) -> tuple:
        """Returns `(array or None, status)`; status is `hit`, `miss` or `corrupt`."""
        try:
            with open(self.path(digest), "rb") as handle:
                contents = handle.read()
        except FileNotFoundError:
            return None, "miss"
        except OSError:
            return None, "corrupt"
        array = _decode(contents)
        return (array, "hit") if array is not None else (None, "corrupt")

    def pack_path(self, digests: list) -> str:
        """Returns the file of the pack of `digests`' entries (which may not exist)."""
        name = hashlib.sha256("\n".join(digests).encode()).hexdigest()[:32]
        return os.path.join(self.directory, PACKS_FOLDER, name + ".bin")

    def load_pack(self, digests: list) -> Optional[np.ndarray]:
        """The entries of `digests` stacked in order, as `store_pack` wrote
        them; `None` if there is no such pack or it is corrupt."""
        path = self.pack_path(digests)
        try:
            with open(path, "rb") as handle:
                # A bytearray, so that the array is writable as `np.stack`'s.
                contents = bytearray(os.fstat(handle.fileno()).st_size)
                read = handle.readinto(contents)
        except OSError:
            return None
        array = _decode(memoryview(contents)) if read == len(contents) else None
        if array is None or array.ndim < 1 or len(array) != len(digests):
            return None
        with contextlib.suppress(OSError):  # Recently used: kept longest.
            os.utime(path)
        return array

    def store_pack(self, digests: list, array: np.ndarray) -> None:
        """Writes `array` (one row per digest) as the pack of `digests`, and
        removes the least recently used packs beyond `MAX_PACKS`.

        Raises:
            OSError: if it cannot be written.
        """
        path = self.pack_path(digests)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        header, payload = _encoded_parts(np.asarray(array, self.dtype))

        def write(stream):
            stream.write(header)
            stream.write(payload)

        write_atomically(path, write)
        packs = []
        with contextlib.suppress(OSError), os.scandir(folder) as found:
            for entry in found:
                if entry.name.endswith(".bin") and entry.is_file():
                    with contextlib.suppress(OSError):
                        packs.append((entry.stat().st_mtime, entry.path))
        for _, stale in sorted(packs, reverse=True)[MAX_PACKS:]:
            with contextlib.suppress(OSError):  # Another run's removal.
                os.remove(stale)

    def store(self, digest: str, array: np.ndarray) -> None:
        """Writes `array`, cast to the cache's dtype, as the entry for `digest`."""
        path = self.path(digest)
        folder = os.path.dirname(path)
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        write_bytes_atomically(path, _encode(np.asarray(array, self.dtype)))

    def dataset(
        self,
        digests: list,
        labels: np.ndarray,
        shape: tuple,
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int = 0,
    ) -> tf.data.Dataset:
        """Streams entries already checked by `load` as `(float32, label)` batches.

        Entries are read from disk as batches are needed, not held in memory;
        shuffling reorders file names before reading, so it costs no memory.
        """
        paths = [self.path(d) for d in digests]
        dtype = tf.as_dtype(self.dtype.name)
        dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
        if shuffle:
            dataset = dataset.shuffle(len(paths), seed=seed,
                                      reshuffle_each_iteration=True)

        def read(path, label):
            payload = tf.strings.substr(tf.io.read_file(path), HEADER_SIZE, -1)
            array = tf.reshape(tf.io.decode_raw(payload, dtype), shape)
            return tf.cast(array, tf.float32), label

        dataset = dataset.map(read, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def feature_cache_key(
    network: keras.Model, name: str, image_size: int, preprocessing: str,
    **extra
) -> dict:
    """The cache key of a network's outputs: see the module docstring."""
    return {
        "network": name,
        "weights": weights_fingerprint(network),
        "image_size": int(image_size),
        "preprocessing": preprocessing,
        "resize": RESIZE_METHOD,
        # Kernels and precision change outputs slightly: never mix them.
        "dtype_policy": keras.config.dtype_policy().name,
        "versions": [tf.__version__, keras.__version__],
        **extra,
    }


def open_cache(directory: Optional[str], key: dict, dtype: str = "float32",
               verbose: bool = True) -> Optional[FeatureCache]:
    """A `FeatureCache`, or `None` with a warning when `directory` is unusable."""
    if directory is None:
        return None
    try:
        return FeatureCache(directory, key, dtype)
    except OSError as error:
        message = (
            f"The feature cache folder {directory} cannot be written "
            f"({error.strerror or error}); features are computed without a cache. "
            "Pass --cache-dir DIR to use another folder or --no-cache to silence this."
        )
        warnings.warn(message, stacklevel=2)
        if verbose:
            print(f"warning: {message}", flush=True)
        return None


def _unchanged(path: str, digest: str):
    """Whether the file still has the scanned content: `True`, `False`, or
    the `OSError` that stopped reading it.

    The file is hashed again before its outputs are cached: one edited since
    the scan would otherwise leave the new image's outputs under the old
    content's key, for good (a changed file's outputs are used this once).
    """
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest() == digest
    except OSError as error:
        return error


def store_or_drop(cache: Optional[FeatureCache], digest: str,
                  value) -> Optional[FeatureCache]:
    """Stores one entry; returns the cache, or `None` once it cannot be written
    (with one warning: the run goes on without it)."""
    if cache is None:
        return None
    try:
        cache.store(digest, value)
        return cache
    except OSError as error:
        return _dropped(cache, error)


def _dropped(cache: FeatureCache, error: OSError) -> None:
    # Named by its root, so that a run dropping its feature and activation
    # caches together (one full disk) warns once: same text, same place.
    root = os.path.dirname(os.path.dirname(cache.directory))
    warnings.warn(
        f"The feature cache {root} could not be written "
        f"({error.strerror or error}); the run goes on without it.",
        stacklevel=2,
    )


class CacheStats(NamedTuple):
    """How the outputs of one `cached_outputs` call were obtained."""

    hits: int
    computed: int
    rebuilt: int


def cached_outputs(
    network: keras.Model,
    paths: list,
    digests: list,
    image_size: int,
    cache,
    batch_size: int = 32,
    keep=True,
    verbose="auto",
    jit_compile: bool = False,
) -> tuple:
    """Runs a frozen network once over the images not yet in `cache`.

    Images are decoded in a `tf.data` pipeline that overlaps the forward passes;
    each output is written to the cache as its batch comes out, so a run killed
    half-way keeps what it computed.

    A network with several outputs fills several caches in the same pass: the
    fine-tuning run's pooled features and the activations at the backbone's
    cut both come from one forward pass per image. Pass one cache (or `None`)
    per output and, if wanted, one `keep` per output; outputs and stats then
    come as tuples, in the network's output order. An image missing from any
    of the caches is computed.

    Args:
        network: A frozen model taking pixels in 0..255; or, with
            `image_size=None`, a callable taking a batch of encoded image bytes.
        paths: Image files.
        digests: SHA-256 of each file's content, as from `scan_image_folder`.
        image_size: Side images are resized to, or `None` to pass raw bytes.
        cache: A `FeatureCache`, or `None` to compute everything in memory;
            or a list of them, one per output of `network`.
        batch_size: Images per forward pass. Defaults to `32`.
        keep: Return the outputs as one array. With `False` (outputs too big to
            hold, e.g. activations for fine-tuning) only the cache is filled and
            `None` is returned. A list gives one value per cache. Defaults to
            `True`.
        verbose: Progress bar over the batches computed: `0` for none, `1` or
            `"auto"` for one. Defaults to `"auto"`.
        jit_compile: Compile the forward pass with XLA (see `train.jit_for`).
            Defaults to `False`.

    Returns:
        `(outputs, stats)`: `outputs` is a float32 array with one row per path,
        in order (or `None` when `keep=False`); `stats` is a
        `CacheStats(hits, computed, rebuilt)`: images found in the cache (in
        every cache, with several), distinct images computed (identical files
        are computed once), and entries found corrupt and computed again.
        With a list of caches, a tuple of outputs and a tuple of stats.

    Raises:
        ValueError: if `paths` is empty and `keep` is `True`.

    Example:

    >>> import os, tempfile, tftransfer
    >>> from tftransfer.cache import cached_outputs
    >>> from tftransfer.demo import write_demo_images
    >>> folder = tempfile.mkdtemp()
    >>> data_dir = write_demo_images(os.path.join(folder, "data"),
    ...                              images_per_class=4, image_size=32)
    >>> files = tftransfer.scan_image_folder(data_dir, validation_split=None).used("")
    >>> paths, digests = [f.path for f in files], [f.digest for f in files]
    >>> backbone = tftransfer.load_backbone("vgg16", weights=None, image_size=32)
    >>> cache = tftransfer.FeatureCache(os.path.join(folder, "cache"),
    ...                                 {"network": "vgg16-random"})
    >>> features, stats = cached_outputs(
    ...     backbone, paths, digests, image_size=32, cache=cache, verbose=0)
    >>> features.shape, stats
    ((12, 512), CacheStats(hits=0, computed=12, rebuilt=0))
    >>> again, stats = cached_outputs(
    ...     backbone, paths, digests, image_size=32, cache=cache, verbose=0)
    >>> stats, bool((again == features).all())
    (CacheStats(hits=12, computed=0, rebuilt=0), True)
    """
    several = isinstance(cache, (list, tuple))
    caches = list(cache) if several else [cache]
    keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep] * len(caches)
    if len(keeps) != len(caches):
        raise ValueError("`keep` needs one value per cache. "
                         f"Received: {len(caches)} caches, keep={keep!r}")
    # One cache of outputs kept: its pack of these images, if written before.
    packed = not several and cache is not None and keeps[0] and bool(paths)
    if packed:
        array = cache.load_pack(digests)
        if array is not None:
            return (array.astype("float32", copy=False),
                    CacheStats(len(paths), 0, 0))
    kept = [[None] * len(paths) for _ in caches]
    todo, rebuilt = [], [0] * len(caches)
    for index, digest in enumerate(digests):
        missing = False
        for which, store in enumerate(caches):
            array, status = store.load(digest) if store else (None, "miss")
            if array is None:
                missing = True
                rebuilt[which] += status == "corrupt"
            elif keeps[which]:
                kept[which][index] = array
        if missing:
            todo.append(index)
    # Identical files are computed once.
    unique = {}
    for index in todo:
        unique.setdefault(digests[index], index)
    if unique:
        order = list(unique.values())
        for indices, values in _ahead(_forward_batches(
                network, [paths[i] for i in order], np.array(order, "int32"),
                image_size, batch_size, verbose, jit_compile)):
            if not several:
                values = [values]
            for row, index in enumerate(indices):
                # Cached only if the file is still what was scanned.
                state = (_unchanged(paths[index], digests[index])
                         if any(c is not None for c in caches) else False)
                packed = packed and state is True
                for which, store in enumerate(caches):
                    value = values[which][row]
                    if store is not None and isinstance(state, OSError):
                        caches[which] = _dropped(store, state)
                    elif store is not None and state:
                        caches[which] = store_or_drop(store, digests[index], value)
                    if keeps[which]:
                        kept[which][index] = value
        for which in range(len(caches)):
            for index in todo:
                kept[which][index] = kept[which][unique[digests[index]]]
    results = []
    for which in range(len(caches)):
        stats = CacheStats(len(paths) - len(todo), len(unique), rebuilt[which])
        if not keeps[which]:
            results.append((None, stats))
        elif not paths:
            raise ValueError("Cannot compute features of an empty list of images.")
        else:
            results.append((np.stack(kept[which]).astype("float32", copy=False), stats))
    # Every output is in the cache under its image's digest (none from a file
    # changed since the scan): the next run reads them as one pack.
    kept = None  # Each row's array: not held while the pack is written.
    if packed and caches[0] is not None and results[0][0].ndim <= _MAX_DIMS:
        try:
            caches[0].store_pack(digests, results[0][0])
        except (OSError, MemoryError):  # The outputs are computed and the
            pass  # entries written: the next run reads those.
    if several:
        return tuple(r[0] for r in results), tuple(r[1] for r in results)
    return results[0]


def _ahead(items, depth: int = 2):
    """Yields what the iterable `items` yields, which a thread computes up to
    `depth` items ahead.

    The forward passes run on that thread while the caller writes the
    previous batch's cache entries (hashing each file again, checksums, one
    file per image and output), which would otherwise stall the backbone:
    on cats_and_dogs the writes were 3 to 4 s of a 29 s pass. An error in
    `items` is raised in the caller; a caller that stops early stops the
    thread and closes `items`. The thread does not inherit the caller's
    thread-local TensorFlow context (a `strategy.scope()`, a `tf.device`):
    `items` must not need it.
    """
    results = queue.Queue(depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                results.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as error:  # Raised again by the caller.
            put((False, error))

    thread = threading.Thread(target=produce, name="tftransfer-forward", daemon=True)
    thread.start()
    try:
        while True:
            more, item = results.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:  # A generator stopped early: its cleanup, now.
            close()


def _forward_batches(network, paths: list, indices: np.ndarray, image_size,
                     batch_size: int, verbose, jit_compile: bool):
    """Yields `(indices, outputs)` of `network` over the images, batch by batch.

    `outputs` is a NumPy array, or a list of them for a network with several
    outputs. Images are decoded in a `tf.data` pipeline that overlaps the
    forward passes.
    """
    if image_size is None:
        # The network decodes itself (an exported SavedModel's raw-bytes
        # signature), so it sees exactly what it sees when serving.
        forward = network
        dataset = (
            tf.data.Dataset.from_tensor_slices((paths, indices))
            .map(lambda path, index: (tf.io.read_file(path), index),
                 num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )
    else:
        forward = tf.function(
            lambda pixels: network(pixels, training=False),
            input_signature=[tf.TensorSpec([None, image_size, image_size, 3])],
            jit_compile=jit_compile,
        )
        dataset = make_dataset(paths, indices, image_size, batch_size)
    steps = -(-len(paths) // batch_size)
    bar = keras.utils.Progbar(
        steps, unit_name="batch", verbose=1 if verbose == "auto" else verbose
    )
    for step, (pixels, batch_indices) in enumerate(dataset, 1):
        values = keras.tree.map_structure(lambda v: v.numpy(), forward(pixels))
        yield batch_indices.numpy(), values
        bar.update(step)

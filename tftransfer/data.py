"""Image folders: scanning, checking every file, stable splits, and tf.data pipelines.

`scan_image_folder` walks a folder, decodes every file once with the same decoder
the pipelines and the exported model use, and records which files are used and why
others are skipped. `image_folder_datasets` turns the result into `tf.data`
pipelines. Keras' `image_dataset_from_directory` is not used because it crashes
mid-epoch on the first unreadable file and cannot report or skip it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from collections import Counter
from typing import NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf

from tftransfer.errors import DataError

SPLIT_NAMES = {
    "train": "train",
    "val": "validation",
    "validation": "validation",
    "test": "test",
}
JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "__macosx", ".git"}
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit.
RESIZE_METHOD = "bilinear"  # Part of the feature cache key: changing it changes features.
# Decoded images of a split are kept in memory, for the epochs after the first,
# when they take at most this many bytes (float32 pixels).
DECODED_CACHE_BYTES = 1 << 30

# Leading bytes of the formats tf.io.decode_image reads, and of common ones it
# does not, so that a skip can say which it was.
_DECODABLE_MAGIC = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
    b"BM": "bmp",
}
_UNSUPPORTED_MAGIC = {
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
    b"\x00\x00\x01\x00": "ico",
    b"8BPS": "psd",
    b"%PDF": "pdf",
}


@dataclasses.dataclass
class ImageFile:
    """One file found under the data folder, and what was decided about it."""

    path: str
    class_name: str
    label: int
    split: str
    digest: str = ""
    status: str = "used"
    reason: str = ""
    image_format: str = ""


@dataclasses.dataclass
class ImageFolder:
    """The result of `scan_image_folder`: classes, files and their splits."""

    root: str
    class_names: list
    files: list
    layout: str  # "splits" (train/ and val/ folders) or "classes" (split by us)

    def used(self, split: str) -> list:
        """Returns the usable files of one split (`train`, `validation`, `test`)."""
        return [f for f in self.files if f.split == split and f.status == "used"]

    def paths_and_labels(self, split: str):
        files = self.used(split)
        return [f.path for f in files], np.array([f.label for f in files], "int32")

    def counts(self) -> dict:
        """Used images per split and class."""
        counts = {}
        for f in self.files:
            if f.status == "used":
                counts.setdefault(f.split, Counter())[f.class_name] += 1
        return {split: dict(sorted(c.items())) for split, c in counts.items()}

    def skipped(self) -> list:
        return [f for f in self.files if f.status == "skipped"]


def decode_image(contents: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decodes one encoded image to float32 pixels in 0..255, resized to a square.

    The one decoder used for training, evaluation and the exported model, so that
    all three see the same pixels. It reads JPEG, PNG, GIF (first frame), BMP and
    WebP, in any channel layout; grayscale and alpha are converted to RGB.
    """
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    image = tf.image.resize(image, [image_size, image_size], method=RESIZE_METHOD)
    return tf.cast(image, tf.float32)


def _is_junk(name: str) -> bool:
    lower = name.lower()
    return lower in JUNK_NAMES or lower.startswith("._") or lower.startswith(".")


def _class_dirs(folder: str) -> list:
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if entry.is_dir() and not _is_junk(entry.name)
    )


def walk_files(folder: str):
    """Yields the files below `folder`, sorted, skipping OS junk and hidden files."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_junk(d))
        for name in sorted(filenames):
            if not _is_junk(name):
                yield os.path.join(dirpath, name)


def _sniff_format(head: bytes) -> tuple:
    for magic, name in _DECODABLE_MAGIC.items():
        if head.startswith(magic):
            return name, True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp", True
    for magic, name in _UNSUPPORTED_MAGIC.items():
        if head.startswith(magic):
            return name, False
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypavif", b"ftypmif1"):
        return head[8:12].decode(), False
    return "", False


def _header_size(contents: bytes, image_format: str):
    """(height, width) from the header, without decoding the pixels, or None."""
    try:
        if image_format == "png":
            width, height = np.frombuffer(contents[16:24], ">u4")
        elif image_format == "gif":
            width, height = np.frombuffer(contents[6:10], "<u2")
        elif image_format == "bmp":
            width, height = np.frombuffer(contents[18:26], "<i4")
        elif image_format == "jpeg":
            height, width = tf.image.extract_jpeg_shape(contents).numpy()[:2]
        else:
            return None
        return abs(int(height)), abs(int(width))
    except (ValueError, tf.errors.OpError):
        return None


def check_image_file(path: str, max_pixels: int = MAX_PIXELS) -> tuple:
    """Checks that a file decodes with `decode_image`.

    Returns:
        `(status, reason, image_format, digest)`: status is `"used"` or
        `"skipped"`; digest is the SHA-256 of the content (empty when unreadable).
    """
    if os.path.islink(path) and not os.path.exists(path):
        return "skipped", "dangling link", "", ""
    try:
        with open(path, "rb") as handle:
            contents = handle.read()
    except OSError as error:
        return "skipped", f"unreadable: {error.strerror or error}", "", ""
    digest = hashlib.sha256(contents).hexdigest()
    if not contents:
        return "skipped", "empty file", "", digest
    image_format, decodable = _sniff_format(contents[:32])
    if not image_format:
        return "skipped", "not an image", "", digest
    if not decodable:
        return "skipped", f"unsupported format ({image_format})", image_format, digest
    size = _header_size(contents, image_format)
    if size and size[0] * size[1] > max_pixels:
        return (
            "skipped",
            f"too many pixels ({size[1]}x{size[0]} > {max_pixels})",
            image_format,
            digest,
        )
    try:
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    except tf.errors.OpError as error:
        message = error.message.split("\n")[0].split("}}")[-1].strip()
        return (
            "skipped",
            f"truncated or corrupt {image_format}: {message}",
            (image_format),
            digest,
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        return "skipped", "image has no pixels", image_format, digest
    return "used", "", image_format, digest


def _stable_split(digest: str, seed: int, validation_split: float) -> str:
    # A file's split depends only on its content and the seed: adding images never
    # moves existing ones, and identical files always land in the same split.
    key = hashlib.sha256(f"{seed}:{digest}".encode()).digest()
    fraction = int.from_bytes(key[:8], "big") / 2**64
    return "validation" if fraction < validation_split else "train"


def scan_image_folder(
    data_dir: str,
    validation_split: Optional[float] = 0.2,
    seed: int = 0,
    max_pixels: int = MAX_PIXELS,
    progress: bool = False,
) -> ImageFolder:
    """Finds, checks and splits the images of a folder of class folders.

    `data_dir` holds either split folders (`train/` and `val/` or `validation/`,
    optionally `test/`, each with one folder per class) or the class folders
    directly; then each image goes to validation or train by a hash of its content
    and `seed`, so the split is stratified in expectation and stable.

    Args:
        data_dir: The folder.
        validation_split: Fraction of images held out when `data_dir` has no split
            folders; `None` leaves such images unsplit (split `""`), for
            evaluation. Defaults to `0.2`.
        seed: Changes which images are held out. Defaults to `0`.
        max_pixels: Images with more pixels are skipped. Defaults to `MAX_PIXELS`.
        progress: Show a progress bar while checking files. Defaults to `False`.

    Returns:
        An `ImageFolder`.

    Raises:
        DataError: a missing folder, no class folders, a class with no usable
            image, a single class, or splits with different classes.
    """
    root = os.path.abspath(os.fspath(data_dir))
    if not os.path.isdir(root):
        raise DataError(
            f"Data folder not found: {data_dir!r}. Expected a folder "
            "with one sub-folder of images per class."
        )
    if validation_split is not None and not 0.0 < validation_split < 1.0:
        raise ValueError(
            "`validation_split` must be between 0 and 1. "
            f"Received: validation_split={validation_split}"
        )
    top = _class_dirs(root)
    split_dirs = {SPLIT_NAMES[d.lower()]: d for d in top if d.lower() in SPLIT_NAMES}
    if "train" in split_dirs and "validation" in split_dirs:
        layout = "splits"
        class_sets = {
            s: _class_dirs(os.path.join(root, d)) for s, d in split_dirs.items()
        }
        class_names = class_sets["train"]
        for split, names in class_sets.items():
            if names != class_names:
                raise DataError(
                    f"The {split_dirs[split]}/ and {split_dirs['train']}/ folders must "
                    f"hold the same class folders. Received: {names} and {class_names}"
                )
        sources = [(s, os.path.join(root, d)) for s, d in split_dirs.items()]
    else:
        layout = "classes"
        class_names = top
        sources = [(None, root)]
    if not class_names:
        raise DataError(
            f"No class folders in {data_dir!r}. Expected one sub-folder "
            "of images per class (or train/ and val/ folders holding them)."
        )
    if len(class_names) < 2:
        raise DataError(
            f"Only one class folder in {data_dir!r} ({class_names[0]!r}); "
            "a classifier needs at least two."
        )
    files = []
    for split, folder in sources:
        for label, name in enumerate(class_names):
            for path in walk_files(os.path.join(folder, name)):
                files.append(ImageFile(path, name, label, split or ""))
    _check_files(files, max_pixels, progress)
    if validation_split is not None:
        for f in files:
            if not f.split:
                f.split = _stable_split(f.digest, seed, validation_split)
    folder = ImageFolder(root, class_names, files, layout)
    counts = folder.counts()
    if layout == "splits":
        required = ("train", "validation")
    else:
        required = ("train",) if validation_split is not None else ("",)
    for split in required:
        empty = [n for n in class_names if not counts.get(split, {}).get(n)]
        if empty:
            where = f" in {split_dirs[split]}/" if layout == "splits" else ""
            raise DataError(
                f"No usable image in class folder(s) {', '.join(map(repr, empty))}"
                f"{where} of {data_dir!r}. Add images or remove the folder."
            )
    if required != ("",) and not folder.used("validation"):
        raise DataError(
            f"No image of {data_dir!r} fell in the validation split; "
            "add images or raise `validation_split`."
        )
    return folder


def _check_files(files: list, max_pixels: int, progress: bool) -> None:
    bar = keras.utils.Progbar(len(files), unit_name="file") if progress else None
    workers = min(8, (os.cpu_count() or 1) * 2)
    # TensorFlow's decoders release the GIL, so threads decode in parallel.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda f: check_image_file(f.path, max_pixels), files)
        for count, (f, result) in enumerate(zip(files, results), 1):
            f.status, f.reason, f.image_format, f.digest = result
            if bar is not None and (count % 50 == 0 or count == len(files)):
                bar.update(count)


class ImageFolderDatasets(NamedTuple):
    """What `image_folder_datasets` returns."""

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: Optional[tf.data.Dataset]
    class_names: list
    folder: ImageFolder


def make_dataset(
    paths: list,
    labels: np.ndarray,
    image_size: int,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    augment=None,
    keep_decoded: bool = False,
) -> tf.data.Dataset:
    """Builds a batched `(pixels, label)` pipeline from image paths.

    Files are read and decoded in parallel (AUTOTUNE) and batches are prefetched.
    Shuffling happens on paths, before decoding, so it costs no memory, unless
    `keep_decoded`: then the first epoch's decoded images are kept in memory
    (`Dataset.cache`) and later epochs shuffle and replay them, decoding
    nothing. `augment`, if given, is a callable applied to each batch in the
    pipeline, every epoch.

    On a CPU the decoding competes with the model for the same cores, so
    decoding once pays even though it overlaps the training steps
    (benchmarks/input_pipeline.py).
    """
    dataset = tf.data.Dataset.from_tensor_slices((list(paths), labels))
    if shuffle and not keep_decoded:
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(
        lambda path, label: (decode_image(tf.io.read_file(path), image_size), label),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not shuffle or keep_decoded,
    )
    if keep_decoded:
        dataset = dataset.cache()
        if shuffle:
            dataset = dataset.shuffle(len(paths), seed=seed,
                                      reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if augment is not None:
        dataset = dataset.map(
            lambda x, y: (augment(x, training=True), y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    options = tf.data.Options()
    # One thread per decoding call: tf.data runs many calls in parallel already,
    # and nested parallelism oversubscribes small machines (measured: +15% of
    # training throughput from files on 2 cores).
    options.threading.max_intra_op_parallelism = 1
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def image_folder_datasets(
    data_dir: str,
    image_size: int,
    batch_size: int = 32,
    validation_split: float = 0.2,
    seed: int = 0,
    augment=None,
    folder: Optional[ImageFolder] = None,
    memory_budget: int = DECODED_CACHE_BYTES,
) -> ImageFolderDatasets:
    """Builds train, validation and (if present) test pipelines from an image folder.

    Args:
        data_dir: A folder of class folders, or of `train/`, `val/` and `test/`
            split folders; see `scan_image_folder`.
        image_size: Side images are resized to.
        batch_size: Defaults to `32`.
        validation_split: Used when there are no split folders. Defaults to `0.2`.
        seed: For the split and the shuffling. Defaults to `0`.
        augment: Optional callable (e.g. a `keras.Sequential` of random layers)
            applied to training batches. Defaults to `None`.
        folder: An `ImageFolder` already scanned, to skip scanning again.
        memory_budget: Bytes of decoded images to keep in memory after the
            first epoch (see `make_dataset`'s `keep_decoded`); splits are kept
            in order (train, validation, test) while they fit. `0` keeps none.
            Defaults to 1 GiB.

    Returns:
        An `ImageFolderDatasets` of `(float32 pixels 0..255, int32 label)` batches.

    Example:

    >>> data = image_folder_datasets("flowers/", image_size=160)  # doctest: +SKIP
    >>> data.class_names  # doctest: +SKIP
    ['daisy', 'rose']
    """
    folder = folder or scan_image_folder(data_dir, validation_split, seed)
    budget = memory_budget

    def fits(split):
        nonlocal budget
        size = len(folder.used(split)) * image_size * image_size * 3 * 4
        if size > budget:
            return False
        budget -= size
        return True

    train = make_dataset(
        *folder.paths_and_labels("train"),
        image_size,
        batch_size,
        shuffle=True,
        seed=seed,
        augment=augment,
        keep_decoded=fits("train"),
    )
    validation = make_dataset(
        *folder.paths_and_labels("validation"), image_size, batch_size,
        keep_decoded=fits("validation"),
    )
    test = None
    if folder.used("test"):
        test = make_dataset(*folder.paths_and_labels("test"), image_size, batch_size,
                            keep_decoded=fits("test"))
    return ImageFolderDatasets(train, validation, test, folder.class_names, folder)

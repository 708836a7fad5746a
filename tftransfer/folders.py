"""Image folders: scanning, checking every file, and stable splits.

`scan_image_folder` walks a folder, decodes every file once with the same decoder
the pipelines and the exported model use (`tftransfer.data.decode_image`), and
records which files are used and why others are skipped. Keras'
`image_dataset_from_directory` is not used because it crashes mid-epoch on the
first unreadable file and cannot report or skip it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from collections import Counter
from typing import Optional

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
    """The result of `scan_image_folder`: classes, files and their splits.

    Args:
        root: Absolute path of the scanned folder.
        class_names: Class folder names, sorted; a file's label is its class's
            index here.
        files: Every `ImageFile` found, used or skipped, with its split.
        layout: How the folder was read: `"splits"` (`train/` and `val/` or
            `validation/` folders, optionally `test/`, used as given),
            `"train_test"` (`train/` and `test/`: validation carved from
            `train/`), `"train_only"` (`train/` alone: validation carved from
            it) or `"classes"` (class folders directly, split by content hash).
        notes: Human-readable remarks on how the folder was read, for callers to
            print (e.g. where the validation split came from). Defaults to `[]`.

    Example:

    >>> import shutil, tempfile
    >>> from tftransfer.demo import write_demo_images
    >>> tmp = tempfile.mkdtemp()
    >>> _ = write_demo_images(tmp, images_per_class=4, image_size=32)
    >>> folder = scan_image_folder(tmp, validation_split=None)
    >>> folder.layout, folder.class_names
    ('classes', ['desert', 'forest', 'ocean'])
    >>> folder.counts()
    {'': {'desert': 4, 'forest': 4, 'ocean': 4}}
    >>> folder.skipped()
    []
    >>> shutil.rmtree(tmp)
    """

    root: str
    class_names: list
    files: list
    layout: str
    notes: list = dataclasses.field(default_factory=list)

    def used(self, split: str) -> list:
        """Returns the usable files of one split (`train`, `validation`, `test`)."""
        return [f for f in self.files if f.split == split and f.status == "used"]

    def paths_and_labels(self, split: str):
        """Returns the usable files of `split` as `(paths, int32 labels)`."""
        files = self.used(split)
        return [f.path for f in files], np.array([f.label for f in files], "int32")

    def labelled_for(self, split: str, class_names: list) -> tuple:
        """The usable files of `split`, labelled by their index in `class_names`.

        For a model trained elsewhere: its class order, not this folder's.

        Returns:
            `(files, int32 labels)`.

        Raises:
            DataError: if the folder has classes that `class_names` lacks.
        """
        unknown = sorted(set(self.class_names) - set(class_names))
        if unknown:
            raise DataError(
                f"Class folder(s) {unknown} of {self.root!r} are not classes of the "
                f"model ({list(class_names)})."
            )
        files = self.used(split)
        order = [list(class_names).index(name) for name in self.class_names]
        return files, np.array([order[f.label] for f in files], "int32")

    def counts(self) -> dict:
        """Used images per split and class."""
        counts = {}
        for f in self.files:
            if f.status == "used":
                counts.setdefault(f.split, Counter())[f.class_name] += 1
        return {split: dict(sorted(c.items())) for split, c in counts.items()}

    def skipped(self) -> list:
        """Returns the files that were found but cannot be used, with reasons."""
        return [f for f in self.files if f.status == "skipped"]


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
    and `seed`, so the split is stratified in expectation and stable. With
    `train/` but no validation folder (`train/` and `test/`, or `train/` alone),
    validation is carved out of `train/` the same way and `test/` is the test
    split; `ImageFolder.notes` says so.

    Args:
        data_dir: The folder.
        validation_split: Fraction of images held out for validation when
            `data_dir` has no validation folder; `None` leaves such images
            unsplit (split `""`), for evaluation. Defaults to `0.2`.
        seed: Changes which images are held out. Defaults to `0`.
        max_pixels: Images with more pixels are skipped. Defaults to `MAX_PIXELS`.
        progress: Show a progress bar while checking files. Defaults to `False`.

    Returns:
        An `ImageFolder`.

    Raises:
        DataError: a missing folder, no class folders, a class with no usable
            image, a single class, split folders without `train/`, or splits
            with different classes.
        ValueError: `validation_split` not between 0 and 1.

    Example:

    >>> import os, shutil, tempfile
    >>> from tftransfer.demo import write_demo_images
    >>> tmp = tempfile.mkdtemp()
    >>> _ = write_demo_images(os.path.join(tmp, "train"), 10, image_size=32)
    >>> _ = write_demo_images(os.path.join(tmp, "test"), 2, image_size=32, seed=1)
    >>> folder = scan_image_folder(tmp, validation_split=0.5)
    >>> folder.layout, folder.class_names
    ('train_test', ['desert', 'forest', 'ocean'])
    >>> folder.counts()["test"]
    {'desert': 2, 'forest': 2, 'ocean': 2}
    >>> print(folder.notes[0])  # doctest: +NORMALIZE_WHITESPACE
    No val/ or validation/ folder: the validation split was carved from train/
    (validation_split=0.5: about 50% of its images, chosen by a hash of each
    file's content and seed=0); test/ is the test split.
    >>> shutil.rmtree(tmp)
    """
    check_folder_options(data_dir, validation_split)
    root = os.path.abspath(os.fspath(data_dir))
    layout, class_names, sources, split_dirs, notes = _layout(
        root, data_dir, validation_split, seed)
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
    folder = ImageFolder(root, class_names, files, layout, notes)
    _check_splits(folder, split_dirs, data_dir, validation_split)
    return folder


def check_folder_options(data_dir: str, validation_split: Optional[float]) -> None:
    """Checks what `scan_image_folder` is given, without reading any file.

    Raises:
        DataError: `data_dir` is not a folder.
        ValueError: `validation_split` is not between 0 and 1.
    """
    if not os.path.isdir(os.fspath(data_dir)):
        raise DataError(
            f"Data folder not found: {data_dir!r}. Expected a folder "
            "with one sub-folder of images per class."
        )
    if validation_split is not None and not 0.0 < validation_split < 1.0:
        raise ValueError(
            "`validation_split` must be between 0 and 1. "
            f"Received: validation_split={validation_split}"
        )


def _layout(root: str, data_dir: str, validation_split, seed: int) -> tuple:
    """How `root` is laid out: `(layout, class names, [(split, folder)],
    {split: folder name}, notes)`; a source's split `""` is split by hash."""
    top = _class_dirs(root)
    split_dirs = {SPLIT_NAMES[d.lower()]: d for d in top if d.lower() in SPLIT_NAMES}
    notes = []
    if split_dirs and "train" not in split_dirs:
        found = ", ".join(f"{d}/" for d in split_dirs.values())
        raise DataError(
            f"{data_dir!r} holds split folder(s) {found} but no train/ folder. "
            "Expected train/ (with optional val/ or validation/, and test/), each "
            "holding one folder per class, or the class folders directly."
        )
    if not split_dirs:
        layout, class_names, sources = "classes", top, [("", root)]
    else:
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
        if "validation" in split_dirs:
            layout = "splits"
        else:
            # No validation folder: train/'s files are split below like class
            # folders are (split ""), so test/ is never mistaken for a class.
            layout = "train_test" if "test" in split_dirs else "train_only"
            notes.append(_carved_note(split_dirs, validation_split, seed))
        sources = [
            ("" if layout != "splits" and s == "train" else s, os.path.join(root, d))
            for s, d in split_dirs.items()
        ]
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
    return layout, class_names, sources, split_dirs, notes


def _check_splits(folder: ImageFolder, split_dirs: dict, data_dir: str,
                  validation_split) -> None:
    """Refuses a class without usable images, or an empty validation split."""
    counts = folder.counts()
    if folder.layout == "splits":
        required = ("train", "validation")
    else:
        required = ("train",) if validation_split is not None else ("",)
    for split in required:
        empty = [n for n in folder.class_names if not counts.get(split, {}).get(n)]
        if empty:
            # Carved layouts draw train, validation and unsplit files from train/.
            split_dir = split_dirs.get(split, split_dirs.get("train"))
            where = f" in {split_dir}/" if split_dir else ""
            raise DataError(
                f"No usable image in class folder(s) {', '.join(map(repr, empty))}"
                f"{where} of {data_dir!r}. Add images or remove the folder."
            )
    if required != ("",) and not folder.used("validation"):
        raise DataError(
            f"No image of {data_dir!r} fell in the validation split; "
            "add images or raise `validation_split`."
        )


def _carved_note(split_dirs: dict, validation_split, seed: int) -> str:
    train = f"{split_dirs['train']}/"
    if validation_split is None:
        note = f"No val/ or validation/ folder: {train} is left unsplit"
    else:
        note = (
            f"No val/ or validation/ folder: the validation split was carved from "
            f"{train} (validation_split={validation_split}: about "
            f"{validation_split:.0%} of its images, chosen by a hash of each file's "
            f"content and seed={seed})"
        )
    if "test" in split_dirs:
        note += f"; {split_dirs['test']}/ is the test split"
    return note + "."


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

"""`tf.data` pipelines of images: the one decoder, and batches from image folders.

`decode_image` is the decoder training, evaluation and the exported model share;
`make_dataset` and `image_folder_datasets` turn files (see
`tftransfer.folders.scan_image_folder`) into batched, prefetched pipelines.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import numpy as np
import tensorflow as tf

from tftransfer.folders import ImageFolder, scan_image_folder

RESIZE_METHOD = "bilinear"  # Part of the feature cache key: changing it changes features.

# Decoded images of a split are kept in memory, for the epochs after the first,
# when they take at most this many bytes (float32 pixels).
DECODED_CACHE_BYTES = 1 << 30


def decode_image(contents: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decodes one encoded image to float32 pixels in 0..255, resized to a square.

    The one decoder used for training, evaluation and the exported model, so that
    all three see the same pixels. It reads JPEG, PNG, GIF (first frame), BMP and
    WebP, in any channel layout; grayscale and alpha are converted to RGB.

    Args:
        contents: A scalar string tensor holding the encoded file's bytes.
        image_size: Side of the square output, in pixels.

    Returns:
        A float32 tensor of shape `(image_size, image_size, 3)`, values in
        0..255.

    Raises:
        tf.errors.InvalidArgumentError: when `contents` is not a decodable image.

    Example:

    >>> pixels = np.full((40, 60, 3), 200, "uint8")
    >>> image = decode_image(tf.io.encode_png(pixels), image_size=32)
    >>> tuple(image.shape), image.dtype.name, float(image[0, 0, 0])
    ((32, 32, 3), 'float32', 200.0)
    """
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    image = tf.image.resize(image, [image_size, image_size], method=RESIZE_METHOD)
    return tf.cast(image, tf.float32)


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

    Args:
        paths: Image file paths.
        labels: One integer label per path.
        image_size: Side images are resized to (see `decode_image`).
        batch_size: Images per batch. Defaults to `32`.
        shuffle: Reshuffle the images every epoch. Defaults to `False`.
        seed: Seed of the shuffling. Defaults to `0`.
        augment: Optional callable (e.g. a `keras.Sequential` of random layers)
            called on each batch as `augment(pixels, training=True)`. Defaults
            to `None`.
        keep_decoded: Keep the decoded images in memory after the first epoch.
            Defaults to `False`.

    Returns:
        A `tf.data.Dataset` of `(float32 pixels 0..255, label)` batches, pixels
        of shape `(batch, image_size, image_size, 3)`.

    Example:

    >>> import os, shutil, tempfile
    >>> tmp = tempfile.mkdtemp()
    >>> paths = [os.path.join(tmp, f"{i}.png") for i in range(5)]
    >>> for i, path in enumerate(paths):
    ...     pixels = np.full((20, 20, 3), 50 * i, "uint8")
    ...     tf.io.write_file(path, tf.io.encode_png(pixels))
    >>> dataset = make_dataset(paths, np.arange(5), image_size=32, batch_size=2)
    >>> [(tuple(x.shape), y.numpy().tolist()) for x, y in dataset]
    [((2, 32, 32, 3), [0, 1]), ((2, 32, 32, 3), [2, 3]), ((1, 32, 32, 3), [4])]
    >>> shutil.rmtree(tmp)
    """
    # Paths as bytes: a file name that is not UTF-8 is still a file to read.
    dataset = tf.data.Dataset.from_tensor_slices(
        ([os.fsencode(p) for p in paths], labels))
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
        batch_size: Images per batch. Defaults to `32`.
        validation_split: Fraction held out for validation when there is no
            validation folder. Defaults to `0.2`.
        seed: For the split and the shuffling. Defaults to `0`.
        augment: Optional callable (e.g. a `keras.Sequential` of random layers)
            applied to training batches. Defaults to `None`.
        folder: An `ImageFolder` already scanned, to skip scanning again.
            Defaults to `None` (scan `data_dir`).
        memory_budget: Bytes of decoded images to keep in memory after the
            first epoch (see `make_dataset`'s `keep_decoded`); splits are kept
            in order (train, validation, test) while they fit. `0` keeps none.
            Defaults to `DECODED_CACHE_BYTES` (1 GiB).

    Returns:
        An `ImageFolderDatasets` (`train`, `validation`, `test` or `None`,
        `class_names`, `folder`) of `(float32 pixels 0..255, int32 label)`
        batches.

    Raises:
        DataError: the folder cannot be used; see `scan_image_folder`.
        ValueError: `validation_split` not between 0 and 1.

    Example:

    >>> import os, shutil, tempfile
    >>> from tftransfer.demo import write_demo_images
    >>> tmp = tempfile.mkdtemp()
    >>> _ = write_demo_images(os.path.join(tmp, "train"), 4, image_size=32)
    >>> _ = write_demo_images(os.path.join(tmp, "val"), 2, image_size=32, seed=1)
    >>> data = image_folder_datasets(tmp, image_size=32, batch_size=4)
    >>> data.class_names, data.test is None
    (['desert', 'forest', 'ocean'], True)
    >>> data.folder.counts()["validation"]
    {'desert': 2, 'forest': 2, 'ocean': 2}
    >>> pixels, labels = next(iter(data.train))
    >>> tuple(pixels.shape[1:]), pixels.dtype.name, labels.dtype.name
    ((32, 32, 3), 'float32', 'int32')
    >>> shutil.rmtree(tmp)
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

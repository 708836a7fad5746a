"""Where a run's images come from: a scanned image folder, or `tf.data` batches.

The phase engine (`tftransfer.engine`) asks the same four things of both: the
outputs of a frozen network for each image (through the on-disk cache, keyed by
each image's content), the labels and content digests in the order of those
outputs, the images themselves as batches, and a fingerprint of the data for
resuming.

- `FolderExamples`: files of a scanned `ImageFolder` (the CLI, `train_run`,
  `distill_run`). Digests are the files' SHA-256 from the scan, so a warm cache
  skips decoding altogether.
- `DatasetExamples`: a user's `(pixels, label)` `tf.data` batches (`fine_tune`).
  Digests are the SHA-256 of each image's pixels, so any deterministic
  pipeline caches; the images are decoded each time, the network is not run.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tftransfer.cache import CacheStats, FeatureCache, cached_outputs, store_or_drop
from tftransfer.data import DECODED_CACHE_BYTES, make_dataset
from tftransfer.folders import ImageFolder

SPLITS = ("train", "validation")


class FolderExamples:
    """This worker's share of a scanned image folder.

    Args:
        folder: The `ImageFolder` share this process reads (all of it on one
            machine; see `Workers.shard`).
        image_size: Side images are resized to.
        batch_size: Examples per batch.
        seed: Shuffling seed.
        totals: Examples per split over all workers. Defaults to this share's.
        augment: Random layers applied to training batches, or `None`.
        memory_budget: Bytes of decoded images kept in memory after the first
            epoch, splits taken in order while they fit. Defaults to 1 GiB.
    """

    def __init__(self, folder: ImageFolder, image_size: int, batch_size: int,
                 seed: int = 0, totals: Optional[dict] = None, augment=None,
                 memory_budget: int = DECODED_CACHE_BYTES):
        self.folder = folder
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment
        self.totals = totals or {s: len(folder.used(s)) for s in SPLITS}
        self._keep_decoded, budget = {}, memory_budget
        for split in (*SPLITS, "test"):
            size = len(folder.used(split)) * image_size * image_size * 3 * 4
            self._keep_decoded[split] = size <= budget
            budget -= size if size <= budget else 0

    def labels(self, split: str) -> np.ndarray:
        return np.array([f.label for f in self.folder.used(split)], "int32")

    def digests(self, split: str) -> list:
        return [f.digest for f in self.folder.used(split)]

    def fingerprint(self) -> str:
        """SHA-256 over every used file's split, label and content."""
        data = hashlib.sha256()
        for f in sorted(self.folder.files, key=lambda f: (f.split, f.path)):
            if f.status == "used":
                data.update(f"{f.split}:{f.label}:{f.digest}\n".encode())
        return data.hexdigest()

    def outputs(self, network, cache: Optional[FeatureCache], split: str,
                keep: bool = True, jit_compile: bool = False, verbose="auto",
                image_size="default") -> tuple:
        """`cached_outputs` of `network` for the split's files, in file order.

        `image_size=None` passes the raw file bytes (a SavedModel teacher).
        """
        files = self.folder.used(split)
        size = self.image_size if image_size == "default" else image_size
        return cached_outputs(network, [f.path for f in files], [f.digest for f in files],
                              size, cache, self.batch_size, keep=keep, verbose=verbose,
                              jit_compile=jit_compile)

    def images(self, split: str, shuffle: bool = False,
               extras: Optional[dict] = None) -> tf.data.Dataset:
        """`(pixels, label)` batches, or `({"inputs": pixels, **extras}, label)`.

        Training batches are augmented when the examples were made with
        `augment`. `extras` are per-file arrays in file order (a teacher's
        logits), which follow each file however it is shuffled.
        """
        paths = [f.path for f in self.folder.used(split)]
        labels = self.labels(split)
        targets = np.arange(len(paths), dtype="int32") if extras else labels
        dataset = make_dataset(paths, targets, self.image_size, self.batch_size,
                               shuffle=shuffle, seed=self.seed,
                               augment=self.augment if split == "train" else None,
                               keep_decoded=self._keep_decoded[split])
        return with_targets(dataset, labels, extras) if extras else dataset


class DatasetExamples:
    """A user's `(pixels, label)` batches, as in `model.fit`.

    Args:
        datasets: `{"train": ..., "validation": ...}` batched `tf.data`
            datasets of float pixels 0..255 at the model's size and integer
            labels. They must give the same images each pass (no random
            augmentation) for their outputs to be cached.
        batch_size: Examples per batch of the datasets made from outputs.
    """

    def __init__(self, datasets: dict, batch_size: int = 32):
        self.datasets = datasets
        self.batch_size = batch_size
        self._labels, self._digests = {}, {}

    @property
    def totals(self) -> dict:
        return {split: len(self.labels(split)) for split in SPLITS}

    def _scan(self, split: str) -> None:
        if split in self._labels:
            return
        labels, digests = [], []
        for pixels, label in self.datasets[split]:
            labels.append(np.asarray(label).reshape(-1))
            digests.extend(_digest(image) for image in np.asarray(pixels))
        self._set(split, labels, digests)

    def _set(self, split, labels, digests):
        if not digests:
            raise ValueError(f"The {split} dataset is empty: it yielded no batch.")
        self._labels[split] = np.concatenate(labels).astype("int32")
        self._digests[split] = digests

    def labels(self, split: str) -> np.ndarray:
        self._scan(split)
        return self._labels[split]

    def digests(self, split: str) -> list:
        self._scan(split)
        return self._digests[split]

    def fingerprint(self) -> str:
        data = hashlib.sha256()
        for split in SPLITS:
            for digest, label in sorted(zip(self.digests(split), self.labels(split))):
                data.update(f"{split}:{label}:{digest}\n".encode())
        return data.hexdigest()

    def outputs(self, network, cache, split: str, keep=True,
                jit_compile: bool = False, verbose="auto") -> tuple:
        """Runs `network` over the batches whose images are not in `cache`.

        Labels and digests are recorded in this pass's order, which is the
        order of the outputs. When the split was scanned already (for a run
        folder's fingerprint) and the cache holds all of it, nothing is decoded
        again: the outputs come in the scan's order. As `cached_outputs`, a
        network with several outputs takes a list of caches (and of `keep`).
        """
        several = isinstance(cache, (list, tuple))
        caches = list(cache) if several else [cache]
        keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep] * len(caches)
        results = self._from_caches(caches, keeps, split)
        if results is None:
            results = self._compute(network, caches, keeps, split, jit_compile)
        return tuple(zip(*results)) if several else results[0]

    def _from_caches(self, caches: list, keeps: list, split: str) -> Optional[list]:
        """`[(outputs, stats)]` per cache when all of a scanned split is cached."""
        if split not in self._digests or any(c is None for c in caches):
            return None
        digests, results = self._digests[split], []
        for cache, keep in zip(caches, keeps):
            found = {}
            for digest in set(digests):
                array = cache.load(digest)[0]  # Checked, then dropped unless kept.
                if array is None:
                    return None
                found[digest] = array if keep else True
            outputs = (np.stack([found[d] for d in digests]).astype(
                "float32", copy=False) if keep else None)
            results.append((outputs, CacheStats(len(digests), 0, 0)))
        return results

    def _compute(self, network, caches: list, keeps: list, split: str,
                 jit_compile: bool) -> list:
        forward = tf.function(lambda x: network(x, training=False),
                              reduce_retracing=True, jit_compile=jit_compile)
        outputs = [[] for _ in caches]
        labels, digests = [], []
        hits = computed = 0
        rebuilt = [0] * len(caches)
        for pixels, label in self.datasets[split]:
            batch = [_digest(image) for image in np.asarray(pixels)]
            found = [[c.load(d) if c else (None, "miss") for d in batch]
                     for c in caches]
            for which, entries in enumerate(found):
                rebuilt[which] += sum(status == "corrupt" for _, status in entries)
            missing = [any(entries[i][0] is None for entries in found)
                       for i in range(len(batch))]
            values = None
            if any(missing):
                values = keras.tree.map_structure(lambda v: v.numpy(), forward(pixels))
                if len(caches) == 1:
                    values = [values]
            computed += sum(missing)
            hits += len(batch) - sum(missing)
            for which, entries in enumerate(found):
                for index, (array, _) in enumerate(entries):
                    if missing[index]:
                        array = values[which][index]
                        caches[which] = store_or_drop(caches[which], batch[index],
                                                      array)
                    if keeps[which]:
                        outputs[which].append(np.asarray(array, "float32"))
            labels.append(np.asarray(label).reshape(-1))
            digests.extend(batch)
        self._set(split, labels, digests)
        return [(np.stack(kept) if keep else None, CacheStats(hits, computed, count))
                for kept, keep, count in zip(outputs, keeps, rebuilt)]

    def images(self, split: str, shuffle: bool = False,
               extras: Optional[dict] = None) -> tf.data.Dataset:
        """The user's own batches (already shuffled as the user chose)."""
        if extras:
            raise ValueError("Extra per-example inputs need an image folder, not "
                             "tf.data batches.")
        return self.datasets[split]


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, "float32").tobytes()).hexdigest()


def with_targets(dataset: tf.data.Dataset, labels: np.ndarray,
                 extras: Optional[dict]) -> tf.data.Dataset:
    """Turns `(x, index)` batches into `(x, label)`, or `({"inputs": x, **extras}, label)`.

    The engine builds every dataset over example indices, so that per-example
    arrays (a teacher's logits) ride along whatever the source of `x` (features,
    cached activations, decoded images) and however it is shuffled.
    """
    labels = tf.constant(labels)
    extras = {name: tf.constant(value) for name, value in (extras or {}).items()}

    def attach(x, index):
        if not extras:
            return x, tf.gather(labels, index)
        from tftransfer.distill import INPUTS

        inputs = {INPUTS: x, **{k: tf.gather(v, index) for k, v in extras.items()}}
        return inputs, tf.gather(labels, index)

    return dataset.map(attach, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE)


def feature_dataset(features, targets, batch_size, shuffle=False, seed=0):
    """Batches of precomputed `(features, targets)`, reshuffled each epoch if asked."""
    dataset = tf.data.Dataset.from_tensor_slices((features, targets))
    if shuffle:
        dataset = dataset.shuffle(len(targets), seed=seed,
                                  reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)

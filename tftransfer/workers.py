"""This process's place in a `tf.distribute` strategy: which worker, of how many.

`make_strategy` picks the strategy: the default one (this process's one
device), `MirroredStrategy` (every GPU of this machine) or
`MultiWorkerMirroredStrategy` (several machines, configured by `TF_CONFIG`).
`Workers` says which worker this process is and carries what the workers must
share: their shard of the images (`Workers.shard`), as many steps each
(`Workers.lockstep`: collective ops need every worker at every step), the
chief's resume state (`Workers.share_state`) and totals over all of them.

Each worker reads its own shard of the images, so backbone features are
computed once over the cluster, not once per worker, and the cache entries the
workers write never collide (they are keyed by image content and written
atomically).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
from typing import Optional

import numpy as np
import tensorflow as tf

from tftransfer.errors import DataError, SettingError, WorkerError, check_choice
from tftransfer.settings import STRATEGIES

# What collective ops raise when a peer has stopped or cannot be reached.
LOST_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.CancelledError,
                    tf.errors.UnknownError, tf.errors.AbortedError,
                    tf.errors.DeadlineExceededError)


def lost_worker(what: str, error: Exception) -> WorkerError:
    """The error to raise when a collective op fails because a peer is gone.

    The error's first line is kept: some of `LOST_PEER_ERRORS` may come from
    a failure of this worker's own.
    """
    detail = (str(error).strip().splitlines() or [""])[0][:300]
    return WorkerError(
        f"Lost contact with the other workers {what} ({type(error).__name__}: "
        f"{detail}). One of them stopped: see its output. Start every worker "
        "again with the same command to resume from the last finished epoch."
    )


def cluster_tasks() -> int:
    """How many chief and worker tasks `TF_CONFIG` names (0 without `TF_CONFIG`).

    Raises:
        ValueError: `TF_CONFIG` is not JSON with a `cluster` dict.
    """
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return 0
    try:
        cluster = json.loads(text)["cluster"]
        return sum(len(cluster.get(job, [])) for job in ("chief", "worker"))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SettingError(
            "TF_CONFIG must be JSON like {\"cluster\": {\"worker\": [\"host1:port\", "
            "\"host2:port\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}. "
            f"Received: TF_CONFIG={text[:200]!r} ({error})"
        ) from error


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The `tf.distribute.Strategy` for a `strategy` setting.

    Args:
        name: `"default"` (one device), `"mirrored"` (all GPUs of this machine,
            or its CPU), `"multi_worker"` (`MultiWorkerMirroredStrategy` over the
            machines `TF_CONFIG` names) or `"auto"`: `multi_worker` when
            `TF_CONFIG` names more than one task, else `mirrored` when this
            machine has more than one GPU, else `default`. Defaults to `"auto"`.

    Create it first thing in a process: `MultiWorkerMirroredStrategy` configures
    TensorFlow's collective ops, which must happen before TensorFlow runs.

    Returns:
        A `tf.distribute.Strategy`: for `"default"`, the one already in effect
        (`tf.distribute.get_strategy()`).

    Raises:
        SettingError: `name` is not one of `STRATEGIES`, `"multi_worker"`
            without `TF_CONFIG`, or a `TF_CONFIG` that is not valid JSON.

    Example:

    >>> strategy = make_strategy("default")
    >>> type(strategy).__name__, strategy.num_replicas_in_sync
    ('_DefaultDistributionStrategy', 1)
    >>> Workers.of(strategy).name
    'default'
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"TF_CONFIG": ""}):
    ...     make_strategy("multi_worker")
    Traceback (most recent call last):
    ...
    tftransfer.errors.SettingError: --strategy multi_worker (strategy='multi_worker') needs TF_CONFIG in the environment, ...
    >>> make_strategy("tpu")
    Traceback (most recent call last):
    ...
    tftransfer.errors.SettingError: `strategy` must be one of ('auto', 'default', 'mirrored', 'multi_worker'). Received: strategy='tpu'
    """
    check_choice("strategy", name, STRATEGIES)
    tasks = cluster_tasks()
    if name == "auto":
        if tasks > 1:
            name = "multi_worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if tasks == 0:
        raise SettingError(
            "--strategy multi_worker (strategy='multi_worker') needs TF_CONFIG in "
            "the environment, naming every worker and this process's place among "
            "them, e.g. TF_CONFIG='{\"cluster\": {\"worker\": [\"host1:12345\", "
            "\"host2:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}'. "
            "See the README's 'Scaling out'."
        )
    # Its coordination service installs TensorFlow's own SIGTERM handler (a
    # preemption notifier, for PreemptionCheckpointHandler, which we do not
    # use): SIGTERM would no longer reach Python, and a scheduler's stop would
    # be ignored. The handler in place before (the command's, which stops the
    # run keeping every finished epoch, or the default) is put back.
    previous = (signal.getsignal(signal.SIGTERM)
                if threading.current_thread() is threading.main_thread() else None)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    return strategy


@dataclasses.dataclass
class Workers:
    """This process's place in a strategy: which worker, of how many.

    Built by `Workers.of(strategy)`. On one machine there is one worker, the
    chief, and `own_loop` is False: Keras' `fit` trains.
    """

    strategy: tf.distribute.Strategy
    index: int = 0
    count: int = 1
    is_chief: bool = True
    own_loop: bool = False

    @classmethod
    def of(cls, strategy: tf.distribute.Strategy) -> Workers:
        if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return cls(strategy)
        resolver = strategy.cluster_resolver
        spec = resolver.cluster_spec()
        jobs = spec.jobs
        count = sum(spec.num_tasks(job) for job in ("chief", "worker") if job in jobs)
        task_type, task_id = resolver.task_type, int(resolver.task_id)
        has_chief = "chief" in jobs
        # The chief is the `chief` task if there is one, else worker 0 (as in
        # tf.distribute's own convention); it is input pipeline 0.
        index = task_id + (1 if has_chief and task_type == "worker" else 0)
        is_chief = task_type == "chief" or (not has_chief and task_id == 0)
        return cls(strategy, index, count, is_chief, own_loop=True)

    @property
    def name(self) -> str:
        """`"multi_worker"`, `"mirrored"` or `"default"`, as in `make_strategy`."""
        if self.own_loop:
            return "multi_worker"
        if isinstance(self.strategy, tf.distribute.MirroredStrategy):
            return "mirrored"
        return "default"

    @property
    def num_replicas_in_sync(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def shard(self, folder):
        """The `ImageFolder` restricted to this worker's share of each split."""
        if self.count == 1:
            return folder
        files = [f for f in folder.files if f.status != "used"]
        for split in ("train", "validation", "test"):
            files.extend(folder.used(split)[self.index::self.count])
        return dataclasses.replace(folder, files=files)

    def lockstep(self, dataset: tf.data.Dataset, total: int, global_batch_size: int):
        """`(x, y, mask)` batches of this worker's shard, as many as every worker's.

        Args:
            dataset: This worker's `(x, y)` batches (any batch size, shuffled or
                not): a shard of `total` examples split `index::count`.
            total: The examples in all workers' shards together.
            global_batch_size: Examples per step over all workers.

        A shard one example short of the largest is padded with a copy of its
        first example, masked out (mask 0), so that every worker runs as many
        steps. Batches are of the global size: `experimental_distribute_dataset`
        cuts each into one piece per replica of the cluster, and (shard policy
        OFF) this worker's replicas take its pieces one after the other, so a
        step takes `global_batch_size / count` examples from each worker.
        """
        size = len(range(self.index, total, self.count))
        if size == 0:
            raise DataError(
                f"{total} images cannot be shared among {self.count} workers: each "
                "worker needs at least one. Use fewer workers or more images."
            )
        largest = math.ceil(total / self.count)
        examples = dataset.unbatch().map(lambda x, y: (x, y, tf.ones((), "float32")))
        if largest > size:
            padding = examples.take(1).map(lambda x, y, m: (x, y, tf.zeros_like(m)))
            examples = examples.concatenate(padding.repeat(largest - size))
        options = tf.data.Options()
        # Already sharded, by image: tf.distribute must not shard it again.
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF
        )
        batched = examples.batch(global_batch_size)
        return batched.prefetch(tf.data.AUTOTUNE).with_options(options)

    def everyone(self, flag: bool) -> bool:
        """Whether `flag` holds on every worker (a collective op across machines)."""
        if not self.own_loop:
            return flag
        strategy = self.strategy
        dissent = tf.constant(0.0 if flag else 1.0)

        @tf.function
        def count(dissent):
            return strategy.reduce(
                "sum", strategy.run(lambda: tf.identity(dissent)), axis=None)

        return float(count(dissent).numpy()) == 0.0

    @contextlib.contextmanager
    def reporting_lost_peers(self, what: str = "during the run"):
        """Across machines, turns a failed collective op into a `WorkerError`
        (see `lost_worker`); on one machine errors pass unchanged."""
        try:
            yield
        except LOST_PEER_ERRORS as error:
            if not self.own_loop:
                raise
            raise lost_worker(what, error) from error

    def total(self, values) -> np.ndarray:
        """The sum of every worker's `values` (numbers, an array), on every worker."""
        values = np.asarray(values, "float64")  # Counts stay exact.
        if not self.own_loop:
            return values
        strategy = self.strategy
        # Each worker's replicas (one per device) share its values equally.
        share = values / (self.num_replicas_in_sync // self.count)

        @tf.function
        def run(share):
            return strategy.reduce(
                "sum", strategy.run(lambda: tf.identity(share)), axis=None)

        return run(tf.constant(share)).numpy()

    def _broadcast(self, value: np.ndarray) -> np.ndarray:
        """The chief's `value` on every worker (others pass zeros, same shape)."""
        strategy = self.strategy

        @tf.function
        def run(value):
            def replica():
                context = tf.distribute.get_replica_context()
                # Replica 0 is the chief's first device; the rest add zeros.
                first = tf.equal(context.replica_id_in_sync_group, 0)
                return context.all_reduce(
                    "sum", value * tf.cast(first, value.dtype))
            return strategy.experimental_local_results(strategy.run(replica))[0]

        return run(tf.constant(value)).numpy()

    def share_state(self, state: Optional[dict], settings: dict) -> Optional[dict]:
        """The chief's resume state, on every worker; checks their settings agree.

        Only the chief's checkpoint counts: the others may have got one epoch
        further or not before a kill, and would disagree. So the chief sends its
        settings and its checkpoint (`RunCheckpoint.load`'s dict, or `None`) to
        all, and every worker resumes from it.

        Raises:
            WorkerError: this worker runs with other settings or other data
                than the chief. (When another worker has stopped, the collective
                ops raise one of `LOST_PEER_ERRORS`; `train_run` reports it.)
        """
        if not self.own_loop:
            return state
        meta, arrays = {"settings": settings}, []
        if self.is_chief and state is not None:
            arrays = [*state["model"], *state["optimizer"]]
            meta["state"] = {key: value for key, value in state.items()
                             if key not in ("model", "optimizer")}
            meta["arrays"] = [[list(a.shape), str(a.dtype)] for a in arrays]
        text = json.dumps(meta, sort_keys=True).encode() if self.is_chief else b""
        flat = (np.concatenate([a.ravel().astype("float32") for a in arrays])
                if arrays else np.zeros(0, "float32"))
        # float64 counts: exact far beyond float32's 2**24.
        sizes = self._broadcast(np.array([len(text), flat.size], "float64"))
        length, total = int(sizes[0]), int(sizes[1])
        if not self.is_chief:
            text, flat = b"\0" * length, np.zeros(total, "float32")
        # Bytes as float32: exact for 0..255.
        text = bytes(self._broadcast(np.frombuffer(text, "uint8").astype("float32"))
                     .astype("uint8"))
        meta = json.loads(text)
        theirs = {k: v for k, v in meta["settings"].items() if k != "data_dir"}
        ours = {k: v for k, v in settings.items() if k != "data_dir"}
        different = sorted(k for k in set(theirs) | set(ours)
                           if theirs.get(k) != ours.get(k))
        if different:
            raise WorkerError(
                f"Worker {self.index} runs with other settings or images than the "
                "chief: " + ", ".join(f"{k}: {theirs.get(k)!r} on the chief, "
                                      f"{ours.get(k)!r} here" for k in different)
                + ". Start every worker with the same command on the same images."
            )
        if "state" not in meta:
            return None
        flat = self._broadcast(flat)  # Every worker takes part, the chief too.
        if self.is_chief:
            return state
        arrays, offset = [], 0
        for shape, dtype in meta["arrays"]:
            size = int(np.prod(shape, dtype="int64"))
            arrays.append(flat[offset:offset + size].reshape(shape).astype(dtype))
            offset += size
        shared = dict(meta["state"])
        shared["model"] = arrays[: shared["num_model"]]
        shared["optimizer"] = arrays[shared["num_model"]:]
        return shared

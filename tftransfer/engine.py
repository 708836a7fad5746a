"""The phase engine: the two-phase schedule, written once for every entry point.

`train_run`, `distill_run` and `fine_tune` each build a model and hand it to an
`Engine` with a `Schedule`, the examples to read (`tftransfer.examples`) and a
task saying what is trained:

1. Head phase (`Schedule.epochs`): the backbone is frozen, so its output for an
   image never changes; it is computed once (`Examples.outputs`, through the
   on-disk cache) and the head trains on it. With augmentation the backbone
   runs on every random view instead. When fine-tuning follows, the same pass
   (`pair_network`) also caches the activations at the cut below the layers
   fine-tuning unfreezes: the backbone runs once per image per run.
2. Fine-tuning phase (`Schedule.fine_tune_epochs`): the top layers of the
   backbone are unfrozen at a lower learning rate, warmed up from 0. The top
   trains from the cached activations (training images float16, validation
   float32; without a cache folder, a spill folder removed at the end),
   streamed from disk, when the graph can be cut at one tensor below the
   unfrozen layers; otherwise on the images.

Every `fit` goes through `Engine.fit`, which resumes the optimizer state of a
killed run, writes `history.csv` and the checkpoint when there is a run folder,
calls the user's callbacks, and uses our own loop across machines
(`distributed_fit`). A task (`ClassifierTask`, or distill's `DistillTask`)
compiles the model each phase trains and may add per-example inputs (a
teacher's logits); a new kind of training is a new task, not a new schedule.
"""

from __future__ import annotations

import dataclasses
import os
import time
import weakref
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tftransfer.backbones import ImagePreprocessing
from tftransfer.cache import feature_cache_key, open_cache
from tftransfer.checkpoint import restore_optimizer, restore_weights
from tftransfer.distribute import distributed_fit
from tftransfer.errors import SettingError
from tftransfer.examples import SPLITS, feature_dataset, with_targets
from tftransfer.fusion import FUSION_LAYER, fused_members, member_path
from tftransfer.graph import backbone_network, split_backbone
from tftransfer.guards import FiniteLoss
from tftransfer.heads import STANDARDIZE
from tftransfer.run_folder import PRUNING_REFERENCE, HistoryCSV, RunFolder
from tftransfer.settings import (
    FINE_TUNE_EMA,
    FINE_TUNE_LEARNING_RATE,
    FINE_TUNE_WARMUP,
    HEAD_LEARNING_RATE,
)
from tftransfer.tensorboard import LOGS_FOLDER, logs_callback
from tftransfer.timings import Timings
from tftransfer.train import (
    AverageAtEnd,
    compile_classifier,
    default_fine_tune_layers,
    jit_for,
    unfreeze_top,
    warm_adam,
)
from tftransfer.workers import Workers

# Training examples the batch normalisation of a pruned top is recalibrated on.
RECALIBRATION_EXAMPLES = 256
# `--prune`: the fraction of fine-tuning's steps by which the sparsity is
# reached. On hymenoptera (5 + 5 epochs, 80%), one run each: 0.25 gave 0.863
# validation accuracy, 0.5 gave 0.889, 0.75 gave 0.837; unpruned 0.928.
PRUNING_END = 0.5
# `--prune` on pointwise kernels: the most refits of the kept weights
# (`reconstruction`), each a few seconds, so the most updates of the masks.
RECONSTRUCTIONS = 4


# The weights' average while fine-tuning spans at most 1 / EMA_SPANS of it.
EMA_SPANS = 4


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How a classifier is trained: the phases, their rates and their data.

    Args:
        epochs: Epochs with the backbone frozen.
        fine_tune_epochs: Epochs with the top of the backbone unfrozen.
            Defaults to `0`.
        fine_tune_layers: Layers to unfreeze. Defaults to `None`: the top 30%.
        learning_rate: Head-phase learning rate. Defaults to `1e-2`.
        fine_tune_learning_rate: Fine-tuning learning rate. Defaults to `1e-4`.
        batch_size: Defaults to `32`.
        seed: Shuffling seed. Defaults to `0`.
        jit: `"auto"`, `"on"` or `"off"` (see `jit_for`). Defaults to `"auto"`.
        augment: The training images are randomly augmented: nothing is
            cached. Defaults to `False`.
        cache_dir: The on-disk cache, or `None` to keep features in memory
            (activations then spill to a folder removed at the end, see
            `Engine.spill_folder`). Defaults to `None`.
        verbose: Progress output. Defaults to `"auto"`.
        lr_decay: Each lower block of the unfrozen backbone learns this many
            times as fast as the block above it (see `discriminative_optimizer`).
            Defaults to `1.0`: one rate.
        fine_tune_warmup: Fine-tuning's rate rises linearly from 0 over this
            fraction of its first epoch (`linear_warmup`). Defaults to `0.3`.
        fine_tune_ema: Fine-tuning validates, checkpoints at its end and keeps
            the exponential moving average of the weights with this momentum
            per step (Keras' `use_ema`), lowered to span at most a quarter of
            fine-tuning (`Schedule.ema`); `0` keeps the last step's. Not with
            `prune` (an average of masked weights is not sparse). Defaults to
            `0.95`.
        prune: Magnitude pruning of the unfrozen kernels while fine-tuning
            (`MagnitudePruning`) to this sparsity, or `None`. Defaults to
            `None`.

    `learning_rate` and `fine_tune_learning_rate` may be `"auto"`: the
    learning-rate finder (`lr_find`) runs before the phase, on its cached
    features or activations, and its suggestion is used and recorded.
    """

    epochs: int
    fine_tune_epochs: int = 0
    fine_tune_layers: Optional[int] = None
    learning_rate: float = HEAD_LEARNING_RATE
    fine_tune_learning_rate: float = FINE_TUNE_LEARNING_RATE
    batch_size: int = 32
    seed: int = 0
    jit: str = "auto"
    augment: bool = False
    cache_dir: Optional[str] = None
    verbose: object = "auto"
    lr_decay: float = 1.0
    fine_tune_warmup: float = FINE_TUNE_WARMUP
    prune: Optional[float] = None
    fine_tune_ema: float = FINE_TUNE_EMA

    def ema(self, phase: str, steps: int) -> float:
        """The momentum of the weights' average in a `phase` of `steps`
        steps, 0 for none: `fine_tune_ema`, lowered so that the average spans
        at most `1 / EMA_SPANS` of the phase (`1 - EMA_SPANS / steps`). At
        0.95 an average over 8 steps would be two-thirds its first step's
        weights, and a short fine-tuning barely seen."""
        if phase != "fine_tune" or self.prune or not self.fine_tune_ema:
            return 0.0
        return max(0.0, min(self.fine_tune_ema, 1 - EMA_SPANS / max(steps, 1)))

    def configured_rate(self, phase: str):
        """`learning_rate` or `fine_tune_learning_rate`: a number or `"auto"`."""
        return self.learning_rate if phase == "head" else self.fine_tune_learning_rate

    @property
    def end(self) -> int:
        return self.epochs + self.fine_tune_epochs


class ClassifierTask:
    """Trains the classifier itself, on sparse cross-entropy (`train`)."""

    def prepare(self, engine: Engine) -> None:
        """Runs before the phases (distillation computes the teacher's logits)."""

    def extras(self, split: str) -> Optional[dict]:
        """Per-example arrays fed beside the inputs, or `None`."""
        return None

    def training_model(self, network: keras.Model, phase: str, optimizer,
                       jit_compile: bool) -> keras.Model:
        """`network` compiled with `optimizer` for `phase`: the model `fit` trains."""
        compile_classifier(network, optimizer=optimizer, jit_compile=jit_compile)
        return network

    def summary(self, engine: Engine) -> dict:
        """What the task adds to the run's summary."""
        return {}


class Engine:
    """Runs a `Schedule` on a `build_classifier` model: see the module docstring.

    Args:
        model: A classifier from `build_classifier` (layers `backbone`, `head`).
        examples: A `FolderExamples` or `DatasetExamples`.
        schedule: The `Schedule`.
        task: What trains. Defaults to a `ClassifierTask`.
        workers: This process's place in its strategy. Defaults to the
            current strategy's.
        run_folder: A locked `RunFolder` with its `checkpoint`, or `None`.
        state: The checkpoint to resume from, or `None`.
        callbacks: The user's Keras callbacks, passed to every `fit`.
        class_weight: `{label: weight}`, as in `fit`, or `None`.
        timings: A `Timings` the stages are added to. Defaults to a new one.
    """

    def __init__(self, model: keras.Model, examples, schedule: Schedule, task=None,
                 workers: Optional[Workers] = None,
                 run_folder: Optional[RunFolder] = None, state: Optional[dict] = None,
                 callbacks=(), class_weight: Optional[dict] = None,
                 timings: Optional[Timings] = None):
        self.model = model
        self.backbone = model.get_layer("backbone")
        self.head = model.get_layer("head")
        # A fusion's member backbones (`tftransfer.fusion`), or `None`.
        self.members = fused_members(self.backbone)
        if self.members is not None and schedule.lr_decay != 1:
            raise SettingError("--lr-decay applies to one backbone, not a fusion: "
                               "leave it at 1.")
        self._check_pruning(schedule)
        self.examples = examples
        self.schedule = schedule
        self.task = task or ClassifierTask()
        self.workers = workers or Workers.of(tf.distribute.get_strategy())
        self.run_folder = run_folder
        self.state = state
        self.callbacks = list(callbacks or [])
        self.class_weight = class_weight
        self.timings = timings or Timings()
        self.cache_dir = None if schedule.augment else schedule.cache_dir
        self.stats = {}  # Per stage: cache hits, computed and rebuilt entries.
        self.xla = {}  # Which stage ran with XLA, for the summary.
        self.from_activations = False
        self.reconstruction = None  # `--prune`'s last refit, if any.
        self.features = {}  # The head phase's validation features.
        # The learning-rate finder's results, per phase (resumed runs reuse them).
        self.found = run_folder.found_rates() if run_folder and state else {}
        self.averaged = {}  # Per phase, the momentum of the weights' average.
        if self.workers.own_loop and "auto" in (schedule.learning_rate,
                                                schedule.fine_tune_learning_rate):
            # Each machine would test on its own share and the steps are
            # not our loop's; a resumed worker could wait on the chief forever.
            raise SettingError(
                "A learning rate of \"auto\" is found on one machine: run "
                "`tftransfer lr-find` with the same options, then pass the rate "
                "it suggests to every worker.")
        self.history = keras.callbacks.History()
        self.history.set_model(model)
        self.history.history, self.history.epoch = {}, []

    def _check_pruning(self, schedule: Schedule) -> None:
        """`prune` is a sparsity, for one Keras Applications backbone that
        fine-tunes (`fine_tune(prune=...)` is checked here; `train`'s config
        checks the same before any build)."""
        from tftransfer.hub import hub_layer
        from tftransfer.pruning import check_fraction

        prune = schedule.prune
        if prune is None:
            return
        check_fraction("prune", prune, low_open=True)
        if (schedule.fine_tune_epochs == 0 or self.members is not None
                or hub_layer(self.backbone) is not None):
            raise ValueError(
                "`prune` prunes the unfrozen top of one Keras Applications "
                "backbone while it fine-tunes: give fine-tuning epochs, and a "
                "backbone that is not a fusion or a hub module. Received: "
                f"prune={prune}, fine_tune_epochs={schedule.fine_tune_epochs}")

    @property
    def start(self) -> int:
        """The last finished epoch: 0 for a new run."""
        return self.state["epoch"] if self.state else 0

    def say(self, message: str) -> None:
        if self.schedule.verbose != 0:
            print(message, flush=True)

    def run(self) -> keras.callbacks.History:
        """Trains both phases from the resume point; returns their `History`."""
        with self.workers.strategy.scope():
            if self.state is not None:
                # Head-phase checkpoints hold the head only: the backbone is as built.
                restore_weights(self.model, self.state)
            self.task.prepare(self)
            self.head_phase()
            self.fine_tune_phase()
        if self.run_folder is not None:  # Epochs before a resume included.
            self.history.history = self.run_folder.history()
            self.history.epoch = list(range(len(self.history.history.get("loss", []))))
        return self.history

    def head_phase(self) -> None:
        """Trains the head with the backbone frozen, on features computed once."""
        schedule = self.schedule
        if self.start >= schedule.epochs:
            return
        with self.timings.stage("features"):
            network, train, validation = self.head_data()
        self.find_rate("head", network, train)
        self.fit(network, "head", train, validation, schedule.epochs, network)

    def head_data(self) -> tuple:
        """`(network, train, validation)` of the head phase.

        The head on features computed once (through the cache), or, with
        augmentation, the whole model on new random views every epoch.
        """
        schedule = self.schedule
        if schedule.augment:  # New random views every epoch: no features to keep.
            return (self.model, self.images("train", shuffle=True),
                    self.images("validation"))
        cache = None if self.members else self.backbone_cache()
        # Fine-tuning to come: the same pass yields the activations at the cut.
        pair = self.pair_network() if schedule.fine_tune_epochs else None
        self.say("Computing backbone features"
                 + (" and the activations at the fine-tuning cut ..." if pair
                    else " ..."))
        datasets, kept = {}, 0
        for split in SPLITS:
            if pair is not None:
                caches = self.activation_caches()
                features, _ = self.outputs(pair, [cache, caches[split]], split,
                                           ("forward", "activations"), keep=(True, False))
            else:
                features = self.frozen_features(split)
            if split == "train":
                self.standardize(features)
            if split == "validation":  # For the run's final predictions.
                self.features[split] = features
            kept += features.nbytes
            indices = np.arange(len(features), dtype="int32")
            datasets[split] = self.with_targets(
                feature_dataset(features, indices, schedule.batch_size,
                                shuffle=split == "train", seed=schedule.seed), split)
        self.activations_filled = pair is not None
        if not self.cache_dir:
            self.say(f"No feature cache: the features are kept in memory "
                     f"({kept / 2**20:.1f} MiB).")
        self.say_cache("Features", "forward",
                       cache if self.members is None else self.member_caches()[0])
        return self.head, datasets["train"], datasets["validation"]

    def standardize(self, features: np.ndarray) -> None:
        """Adapts the head's `standardize` layer, if it has one, to the
        training features (the same features give the same statistics, so a
        resumed run's head finds what it was trained with)."""
        layer = next((layer for layer in self.head.layers
                      if layer.name == STANDARDIZE), None)
        if layer is not None:
            layer.adapt(features)

    def frozen_features(self, split: str, stage: str = "forward") -> np.ndarray:
        """The head's inputs for a split's images: the frozen backbone's
        features through the cache (a fusion's members' joined), counted
        under `stage`."""
        if self.members:
            return self.fused_features(split, stage)
        return self.outputs(self.backbone, self.backbone_cache(), split, stage)

    def backbone_cache(self):
        """The backbone's feature cache, opened once (its key hashes every
        weight of the backbone)."""
        if not hasattr(self, "_backbone_cache"):
            self._backbone_cache = self.open_cache(self.backbone)
        return self._backbone_cache

    def member_caches(self) -> list:
        """Each fusion member's feature cache, under the key a single run of
        that member uses (its own network, image size and preprocessing), so
        that the members' features are shared with their single runs."""
        if not hasattr(self, "_member_caches"):
            side = int(self.model.input_shape[1])
            self._member_caches = []
            for member in self.members:
                size = int(member.input_shape[1])
                # A user's batches come at the fused size: a member at
                # another size sees them resized, which a key must say.
                extra = ({} if size == side or self.on_folder
                         else {"resized_from": side})
                self._member_caches.append(self.open_cache(
                    member, backbone=member, image_size=size, **extra))
        return self._member_caches

    @property
    def on_folder(self) -> bool:
        """Whether the examples are files, decoded at any size asked."""
        return hasattr(self.examples, "image_size")

    def fused_features(self, split: str, stage: str = "forward") -> np.ndarray:
        """A fusion's features of a split: each member's (computed once per
        image, through its cache), joined by the backbone's `fusion` layer.

        From image files each member decodes at its own size, as its single
        run does; from a user's batches the member sees them through the
        backbone's resizing.
        """
        parts = []
        for index, (member, cache) in enumerate(zip(self.members,
                                                    self.member_caches())):
            options = {}
            network = member
            if self.on_folder:
                options["image_size"] = int(member.input_shape[1])
            else:
                network = member_path(self.backbone, index)
            parts.append(self.outputs(network, cache, split, stage, **options))
        fusion = self.backbone.get_layer(FUSION_LAYER)
        return np.asarray(keras.ops.convert_to_numpy(fusion(parts, training=False)),
                          "float32")

    def fine_tune_phase(self) -> None:
        """Unfreezes the top of the backbone and trains it at the lower rate."""
        schedule = self.schedule
        if schedule.fine_tune_epochs == 0 or self.start >= schedule.end:
            return
        with self.timings.stage("activations"):
            network, train, validation = self.fine_tune_data()
        if not self.range_test_in_fit("fine_tune"):
            self.find_rate("fine_tune", network, train)
        self.fit(network, "fine_tune", train, validation, schedule.end, self.model)
        self.backbone.trainable = False

    def fine_tune_data(self) -> tuple:
        """Unfreezes the top of the backbone; `(network, train, validation)`.

        The top and the head on cached activations of the frozen bottom when
        the graph can be cut and they could be written (`activations`), else
        the whole model on the images.
        """
        if self.members is None:
            tops = [(self.backbone, self.fine_tune_layers)]
        else:  # The top of each member.
            self.backbone.trainable = True
            tops = [(member, self.schedule.fine_tune_layers
                     or default_fine_tune_layers(member)) for member in self.members]
        for network, count in tops:
            if unfreeze_top(network, count) == 0:
                self.say(f"warning: the top {count} layers of "
                         f"{backbone_network(network).name} hold no weights to train "
                         "(pooling, batch normalisation): fine-tuning trains the head "
                         "alone. Unfreeze more layers (--fine-tune-layers, "
                         "fine_tune_layers=).")
        caches = self.activations()
        if caches is None:
            return self.model, self.images("train", shuffle=True), self.images(
                "validation")
        train, validation = (
            self.with_targets(self.activation_dataset(caches[split], split,
                                                      shuffle=split == "train"),
                              split)
            for split in SPLITS)
        self.from_activations = True
        return self.top_network(), train, validation

    @property
    def fine_tune_layers(self) -> int:
        """How many of the backbone's top layers fine-tuning unfreezes."""
        return self.schedule.fine_tune_layers or default_fine_tune_layers(self.backbone)

    def cut(self) -> Optional[tuple]:
        """`(bottom, top)` of the backbone below and above the fine-tuned
        layers (`split_backbone`), or `None` when its graph cannot be cut."""
        if not hasattr(self, "_cut") and self.members is not None:
            self._cut = None
            self.say("A fusion fine-tunes the top of each member on the images.")
        if not hasattr(self, "_cut"):
            self._cut = split_backbone(self.backbone, self.fine_tune_layers)
            if self._cut is None:
                self.say("The backbone's graph cannot be cut below its top "
                         f"{self.fine_tune_layers} layers; fine-tuning runs on the "
                         "images.")
        return self._cut

    def top_network(self) -> keras.Model:
        """The head on the backbone's top: what fine-tuning trains on activations."""
        if not hasattr(self, "_top_network"):
            top = self.cut()[1]
            inputs = keras.Input(tuple(top.input.shape[1:]), name="activations")
            self._top_network = keras.Model(
                inputs, self.head(top(inputs, training=False)), name="classifier_top")
        return self._top_network

    def pair_network(self) -> Optional[keras.Model]:
        """The backbone with two outputs, the pooled features and the
        activations at the cut, so that one pass over the images serves both
        phases; or `None` when the activations cannot be cached."""
        if self.start >= self.schedule.epochs or self.activation_caches() is None:
            return None
        bottom, top = self.cut()
        return keras.Model(bottom.inputs, [top(bottom.output), bottom.output],
                           name="backbone_pair")

    def activation_caches(self) -> Optional[dict]:
        """The caches of the bottom's activations, per split, or `None`.

        Training activations are stored as float16 (they are read every
        epoch: half the disk and the reads); validation ones as float32, so
        that the final predictions made from them are the served model's.
        Without a cache folder they spill to a temporary folder, removed at
        the end of the run: the process never holds them in memory.
        """
        if hasattr(self, "_activation_caches"):
            return self._activation_caches
        self._activation_caches = None
        if self.schedule.augment or self.cut() is None:
            return None
        bottom, top = self.cut()
        where = [len(top.layers), list(top.input.shape)]
        for directory in (self.cache_dir, "spill"):
            if directory == "spill":  # No cache folder, or one that failed.
                directory = self.spill_folder()
            if not directory:
                continue
            caches = {split: self.open_cache(bottom, dtype, directory, cut=where)
                      for split, dtype in (("train", "float16"),
                                           ("validation", "float32"))}
            if all(caches.values()):
                self._activation_caches = caches
                break
        return self._activation_caches

    def spill_folder(self) -> Optional[str]:
        """A folder for activations when there is no usable cache folder.

        `RUN_DIR/.activations` in a run folder (a killed run's is reused when
        it resumes), else a temporary folder (in `$TMPDIR`: point it at a
        disk where `/tmp` is held in memory). Either is removed by `close`.
        """
        import shutil
        import tempfile

        try:
            if self.run_folder is not None:
                self._spill = self.run_folder.file(".activations")
                os.makedirs(self._spill, exist_ok=True)
            else:
                self._spill = tempfile.mkdtemp(prefix="tftransfer-activations-")
        except OSError as error:
            self.say(f"No folder for activations ({error}); fine-tuning runs on "
                     "the images.")
            return None
        # Removed at exit too, if `close` is never reached (an exception).
        self._spill_finalizer = weakref.finalize(self, shutil.rmtree, self._spill,
                                                 ignore_errors=True)
        self.say(f"Activations are written to {self._spill} and removed at the end "
                 "of the run.")
        return self._spill

    def activation_dataset(self, cache, split: str, shuffle: bool = False):
        """`(activations, index)` batches of a split, streamed from `cache`."""
        digests = self.examples.digests(split)
        return cache.dataset(digests, np.arange(len(digests), dtype="int32"),
                             tuple(self.cut()[1].input.shape[1:]),
                             self.schedule.batch_size, shuffle=shuffle,
                             seed=self.schedule.seed)

    def activations(self) -> Optional[dict]:
        """Caches the activations below the top `fine_tune_layers` layers.

        The head phase's pass filled them already unless it was skipped (a
        resumed run) or ran on augmented images.

        Returns:
            The caches per split, or `None` to fine-tune on the images (no
            cache, a graph that cannot be cut, or entries that could not be
            written).
        """
        caches = self.activation_caches()
        if caches is not None:
            if not getattr(self, "activations_filled", False):
                self.say("Computing activations below the top "
                         f"{self.fine_tune_layers} layers ...")
                for split in SPLITS:
                    self.outputs(self.cut()[0], caches[split], split, "activations",
                                 keep=False)
            if not all(os.path.exists(caches[split].path(digest)) for split in SPLITS
                       for digest in self.examples.digests(split)):
                self.say("Some activations could not be cached (a file changed, or "
                         "the cache could not be written); fine-tuning runs on the "
                         "images.")
                caches = None
            else:
                self.say_cache("Activations", "activations", caches["train"])
        # Every worker must build the same model and take the same steps.
        if not self.workers.everyone(caches is not None):
            if caches is not None:
                self.say("Another worker could not cache its activations; "
                         "fine-tuning runs on the images.")
            caches = None
        return caches

    def final_predictions(self) -> Optional[tuple]:
        """`(network, batches)` giving the trained model's validation logits
        without a backbone pass: the head on the features when only the head
        trained, the fine-tuned top on the float32 activations after
        fine-tuning on them; `None` when the images must be run."""
        if self.schedule.fine_tune_epochs == 0 and "validation" in self.features:
            features, labels = self.features["validation"], self.examples.labels(
                "validation")
            return self.head, [(features[i:i + 256], labels[i:i + 256])
                               for i in range(0, len(labels), 256)]
        if self.schedule.fine_tune_epochs and self.from_activations:
            caches = self.activation_caches()
            return self.top_network(), with_targets(
                self.activation_dataset(caches["validation"], "validation"),
                self.examples.labels("validation"), None)
        return None

    def close(self) -> None:
        """Removes the folder activations spilled to, if any."""
        finalizer = getattr(self, "_spill_finalizer", None)
        if finalizer is not None:
            finalizer()

    def open_cache(self, network: keras.Model, dtype: str = "float32",
                   directory: Optional[str] = None, backbone=None,
                   image_size: Optional[int] = None, **extra):
        """The cache of `network`'s outputs, or `None` (no cache, or unusable).

        `directory` defaults to the schedule's cache folder; `backbone` (what
        names the network) to the engine's; `image_size` to the model's.
        """
        directory = directory or self.cache_dir
        if not directory:
            return None
        name, preprocessing = network_identity(backbone or self.backbone)
        key = feature_cache_key(network, name,
                                image_size or int(self.model.input_shape[1]),
                                preprocessing, **extra)
        return open_cache(directory, key, dtype=dtype,
                          verbose=self.schedule.verbose != 0)

    def outputs(self, network, cache, split: str, stage, keep=True, **options):
        """`network`'s outputs for a split's examples, counted under `stage`.

        A network with several outputs takes a list of caches and a tuple of
        stages (and of `keep`), one per output.
        """
        compiled = options.pop("jit_compile", None)
        if compiled is None:
            compiled = jit_for(self.schedule.jit, network)
        stages = stage if isinstance(stage, tuple) else (stage,)
        self.xla["forward" if stages[0] == "activations" else stages[0]] = compiled
        outputs, stats = self.examples.outputs(
            network, cache, split, keep=keep, jit_compile=compiled,
            verbose=self.schedule.verbose, **options)
        for name, counted in zip(stages, stats if isinstance(stage, tuple)
                                 else (stats,)):
            counts = self.stats.setdefault(name, {})
            for key, value in counted._asdict().items():
                counts[key] = counts.get(key, 0) + value
        return outputs

    def say_cache(self, what: str, stage: str, cache) -> None:
        counts = self.stats.get(stage, {})
        where = f" (cache: {cache.directory})" if cache else " (no cache)"
        self.say(f"{what}: {counts.get('hits', 0)} from cache, "
                 f"{counts.get('computed', 0)} computed, "
                 f"{counts.get('rebuilt', 0)} corrupt entries rebuilt{where}")

    def with_targets(self, dataset: tf.data.Dataset, split: str) -> tf.data.Dataset:
        """`(x, index)` batches to `(x, label)`, with the task's extra inputs."""
        return with_targets(dataset, self.examples.labels(split), self.task.extras(split))

    def images(self, split: str, shuffle: bool = False) -> tf.data.Dataset:
        """Batches of the split's images, with the task's extra inputs."""
        return self.examples.images(split, shuffle, self.task.extras(split))

    def fit(self, network: keras.Model, phase: str, train, validation, end: int,
            weights_model: keras.Model):
        """Compiles `network` through the task and trains it up to epoch `end`.

        Restores the optimizer state the same phase left in the checkpoint.
        Each epoch appends its `history.csv` row, and the chief checkpoints
        `weights_model` (what the phase changes), before the user's callbacks.
        """
        schedule, workers, state = self.schedule, self.workers, self.state
        # Across machines the training steps are our own, never compiled by XLA.
        compiled = not workers.own_loop and jit_for(schedule.jit, network)
        optimizer = self.optimizer(phase, train)
        model = self.task.training_model(network, phase, optimizer, compiled)
        if self.range_test_in_fit(phase):
            # Keras keeps an optimizer's schedule in `_learning_rate`.
            self.find_rate(phase, model, train, schedule=optimizer._learning_rate)
        self.xla[phase] = bool(model.jit_compile)
        # Only the same phase trained on the same model (activations or images)
        # left an optimizer state that fits.
        if (state and state["phase"] == phase
                and state.get("training_model") == model.name
                and not restore_optimizer(model, state)):
            self.say("warning: the optimizer state in the checkpoint does not fit; "
                     "it starts afresh")
        initial_epoch = max(self.start, schedule.epochs if phase == "fine_tune" else 0)
        # First: a non-finite epoch must stop before it is recorded or saved.
        rate = self.rate(phase)
        callbacks = [FiniteLoss(phase, rate if isinstance(rate, float) else None,
                                "--learning-rate" if phase == "head"
                                else "--fine-tune-learning-rate")]
        if self.averaged.get(phase):
            # Validation sees the average; the last epoch's checkpoint holds
            # it, so a run killed after it exports what a whole run would.
            callbacks += [keras.callbacks.SwapEMAWeights(),
                          AverageAtEnd(end)]
        pruning = phase == "fine_tune" and schedule.prune
        if pruning:
            # Before the checkpoint: each epoch's checkpoint holds masked weights.
            callbacks.append(self.pruning_callback(network, train))
        if self.run_folder is not None:
            callbacks.append(HistoryCSV(self.run_folder.history_path, phase))
            if workers.is_chief:  # Only the chief's checkpoint is resumed from.
                callbacks.append(self.run_folder.checkpoint.callback(
                    weights_model, model, phase))
                callbacks.append(logs_callback(self.run_folder.file(LOGS_FOLDER)))
        callbacks += self.callbacks
        started = time.perf_counter()
        try:
            result = self._fit(model, train, validation, end, initial_epoch, callbacks)
        finally:
            if pruning:  # Stopped mid-way: no mask stays on the user's model.
                from tftransfer.pruning import strip_pruning

                strip_pruning(self.model)
        self.timings.add(phase, time.perf_counter() - started)
        self._record(result, phase)
        return result

    def _fit(self, model, train, validation, end, initial_epoch, callbacks):
        schedule, workers = self.schedule, self.workers
        if not workers.own_loop:
            # Our datasets shuffle themselves: `shuffle=False` says so to Keras.
            return model.fit(train, validation_data=validation, epochs=end,
                             initial_epoch=initial_epoch, callbacks=callbacks,
                             class_weight=self.class_weight, shuffle=False,
                             verbose=schedule.verbose)
        totals, size = self.examples.totals, schedule.batch_size
        return distributed_fit(
            workers, model, workers.lockstep(train, totals["train"], size),
            workers.lockstep(validation, totals["validation"], size),
            epochs=end, initial_epoch=initial_epoch, callbacks=callbacks,
            class_weight=self.class_weight, verbose=schedule.verbose,
            example_losses=getattr(model, "example_losses", None))

    def pruning_callback(self, network: keras.Model, train) -> keras.callbacks.Callback:
        """`--prune`: `MagnitudePruning` of the unfrozen backbone's kernels
        (not the head's), reaching the sparsity half-way through fine-tuning
        (`PRUNING_END`) so the second half recovers at it. Its schedule follows the
        optimizer's step count, which a resumed run restores.

        After each update of the masks the pruned network is brought back
        towards the dense one, on up to `RECALIBRATION_EXAMPLES` training
        examples: when fine-tuning runs on cached activations and every
        pruned kernel is a pointwise one (MobileNet, EfficientNet), the kept
        weights are refitted layer by layer to the outputs the network had
        when this fine-tuning began (`reconstruction`), at most
        `RECONSTRUCTIONS` times; otherwise the unfrozen top's batch
        normalisation takes the statistics of its pruned inputs
        (`recalibrate_batch_norm`)."""
        from tftransfer.pruning import (
            MagnitudePruning,
            prunable_kernels,
            recalibrate_batch_norm,
        )
        from tftransfer.reconstruction import reconstruct

        steps = self.steps_per_epoch(train)
        total = steps * self.schedule.fine_tune_epochs
        end = max(1, round(PRUNING_END * total))
        top = backbone_network(self.backbone).layers[-self.fine_tune_layers:]
        norms = [layer for layer in top
                 if isinstance(layer, keras.layers.BatchNormalization)]
        # Not the depthwise kernels: 9 weights per channel, under 2% of
        # MobileNet 0.75's unfrozen weights, and pruning them 80% took a
        # linear probe on hymenoptera from 0.93 to 0.73 where pruning the
        # others alone (and recalibrating) kept 0.87.
        self.pruned_kernels = prunable_kernels(
            backbone_network(self.backbone), skip=(keras.layers.DepthwiseConv2D,))
        self.dense_kernels_gzip_bytes = self.dense_reference()
        batches, count = [], 0
        for inputs, _ in train:
            batches.append(inputs)
            count += len(inputs)
            if count >= RECALIBRATION_EXAMPLES:
                break
        sample = tf.concat(batches, 0)[:RECALIBRATION_EXAMPLES]
        targets = self.reconstruction_targets(sample)
        frequency = max(1, steps // 4)
        if targets is not None:
            frequency = max(frequency, -(-end // RECONSTRUCTIONS))

        def bring_back(sparsity):
            if sparsity <= 0:
                return
            if targets is not None:
                errors = reconstruct(targets)
                self.reconstruction = {
                    "layers": [layer.name for layer in targets.layers],
                    "sparsity": round(float(sparsity), 4),
                    "relative_error_before": [round(e[0], 4) for e in errors],
                    "relative_error_after": [round(e[1], 4) for e in errors]}
            elif norms:
                recalibrate_batch_norm(network, sample, norms)

        return MagnitudePruning(self.schedule.prune, begin_step=0, end_step=end,
                                frequency=frequency, kernels=self.pruned_kernels,
                                on_update=bring_back)

    def reconstruction_targets(self, sample):
        """The dense outputs `--prune` refits the pruned layers to
        (`DenseTargets` of the backbone's top on `sample`, cached activations),
        or `None` where the top does not run on them or holds a pruned kernel
        that is not pointwise. Taken from the network as it is now: dense when
        fine-tuning starts; a resumed run keeps the network it resumed from."""
        from tftransfer.reconstruction import DenseTargets, reconstructable

        if not self.from_activations or self.members is not None:
            return None
        top = self.cut()[1]
        pruned = {id(kernel) for kernel in self.pruned_kernels}
        layers = [layer for layer in top.layers
                  if id(getattr(layer, "kernel", None)) in pruned]
        if not layers or len(layers) != len(pruned) or not all(
                reconstructable(layer) for layer in layers):
            return None
        return DenseTargets(top, layers, sample, seed=self.schedule.seed)

    def dense_reference(self) -> int:
        """The gzip size of the kernels `--prune` prunes, dense as fine-tuning
        found them: what the pruned kernels are measured against. Kept in the
        run folder, since a resumed run finds them pruned already."""
        import gzip

        saved = (self.run_folder.read_json(PRUNING_REFERENCE) or {}
                 if self.run_folder is not None and self.state else {})
        if "dense_kernels_gzip_bytes" in saved:
            return saved["dense_kernels_gzip_bytes"]
        dense = b"".join(np.asarray(kernel).tobytes() for kernel in self.pruned_kernels)
        size = len(gzip.compress(dense, 9))
        if self.run_folder is not None and self.workers.is_chief:
            self.run_folder.write_json(PRUNING_REFERENCE,
                                       {"dense_kernels_gzip_bytes": size})
        return size

    def rate(self, phase: str) -> float:
        """The learning rate of `phase`: the schedule's, or the finder's."""
        rate = self.schedule.configured_rate(phase)
        if rate != "auto":
            return rate
        if phase in self.found:
            return self.found[phase]["suggested_learning_rate"]
        return HEAD_LEARNING_RATE if phase == "head" else FINE_TUNE_LEARNING_RATE

    def optimizer(self, phase: str, train=None) -> keras.optimizers.Optimizer:
        """A new optimizer for `phase`: Adam, one per block with `lr_decay`;
        fine-tuning's rates warm up over `fine_tune_warmup` of an epoch of
        `train` (the phase's training batches)."""
        from tftransfer.hub import hub_layer

        steps = 0
        if phase == "fine_tune" and self.schedule.fine_tune_warmup:
            steps = round(self.schedule.fine_tune_warmup * self.steps_per_epoch(train))
        # A TF-Hub backbone is one layer: one block, one rate.
        if (phase == "fine_tune" and self.schedule.lr_decay != 1
                and hub_layer(self.backbone) is None):
            from tftransfer.discriminative import discriminative_optimizer

            return discriminative_optimizer(backbone_network(self.backbone),
                                            self.rate(phase), self.schedule.lr_decay,
                                            warmup_steps=steps,
                                            ema=self.ema(phase, train))
        return warm_adam(self.rate(phase), steps, self.ema(phase, train),
                         adjustable=self.range_test_in_fit(phase))

    def range_test_in_fit(self, phase: str) -> bool:
        """Whether `phase`'s range test is still to run, through the phase's
        own compiled `fit` (`lr_find_in_fit`), so that fine-tuning reuses the
        step it traces: fine-tuning at an `"auto"` rate with a plain Adam
        (no `--lr-decay`), on one machine, without class weights (which
        change the batches `fit` traces) or a task's extra inputs."""
        from tftransfer.hub import hub_layer

        return (phase == "fine_tune" and phase not in self.found
                and self.schedule.configured_rate(phase) == "auto"
                and not self.workers.own_loop and self.class_weight is None
                and self.task.extras("train") is None
                and (self.schedule.lr_decay == 1
                     or hub_layer(self.backbone) is not None))

    def ema(self, phase: str, train) -> float:
        """The momentum of `phase`'s average of the weights (`Schedule.ema`),
        recorded in `self.averaged`, for `train`'s batches."""
        epochs = (self.schedule.fine_tune_epochs if phase == "fine_tune"
                  else self.schedule.epochs)
        momentum = self.schedule.ema(phase, epochs * self.steps_per_epoch(train))
        self.averaged[phase] = momentum
        return momentum

    def steps_per_epoch(self, train) -> int:
        """Batches in an epoch of `train`: its cardinality when known (a
        user's batches need not be `batch_size`), else from the totals."""
        count = -1
        if train is not None and not self.workers.own_loop:
            count = int(train.cardinality())
        if count > 0:
            return count
        return -(-self.examples.totals["train"] // self.schedule.batch_size)

    def find_rate(self, phase: str, network: keras.Model, train,
                  schedule=None) -> None:
        """With an `"auto"` rate, runs the range test on `network` (`lr_find`).

        Skipped when the rate is set, or was found before a resume. The
        finder steps on the phase's own training batches (features or
        activations when cached, so it costs seconds); the weights are put
        back. A fine-tuning rate is at most a tenth of the head's. Not
        across machines (`Engine` refuses it there). With `schedule`, the
        `AdjustableWarmup` of compiled `network`'s optimizer, the test steps
        through `network.fit` (`lr_find_in_fit`) and the rate found is set in
        `schedule`.
        """
        from tftransfer.lr_find import (
            FINE_TUNE_RANGE,
            lr_find,
            lr_find_in_fit,
            plot_record,
        )

        if self.schedule.configured_rate(phase) != "auto" or phase in self.found:
            return
        self.say(f"Finding the {phase.replace('_', '-')} learning rate ...")
        if self.task.extras("train") is not None:
            raise ValueError("The learning-rate finder trains on labels alone; "
                             "this task feeds more. Set the learning rate.")
        with self.timings.stage("lr_find"):
            options = FINE_TUNE_RANGE if phase == "fine_tune" else {}
            result = (lr_find(network, train, **options) if schedule is None
                      else lr_find_in_fit(network, train, schedule, **options))
        record = result.record()
        suggested = result.suggested_learning_rate
        if phase == "fine_tune":
            # A head still far from trained makes the loss fall along the
            # whole ramp and diverge late: the pretrained layers would then
            # be taken far too fast (0.005 on flowers128, val 0.24). They
            # never move faster than a tenth of the head's rate.
            record["ceiling"] = self.rate("head") / 10
            suggested = min(suggested, record["ceiling"])
        record["suggested_learning_rate"] = float(suggested)
        if schedule is not None:
            schedule.learning_rate.assign(suggested)
        self.found[phase] = record
        self.say(f"Suggested {phase.replace('_', '-')} learning rate: "
                 f"{record['suggested_learning_rate']:.3g} "
                 f"({record['steps']} steps, {record['seconds']:.1f} s)")
        if self.run_folder is not None and self.workers.is_chief:
            self.run_folder.save_found_rates(self.found)
            plot_record(record, self.run_folder.file(f"lr_find_{phase}.png"))

    def compile_for_use(self, model: Optional[keras.Model] = None) -> None:
        """Leaves `model` compiled, so that `evaluate` and `predict` work.

        Called once the model is saved (`model.keras` then holds no optimizer
        it never used). A model fine-tuned on the images keeps its optimizer;
        otherwise it gets Adam at the last phase's rate.

        Args:
            model: The trained classifier, or a plain copy of it. Defaults to
                `None`: the engine's own.
        """
        model = model or self.model
        trained_itself = (model is self.model and self.schedule.fine_tune_epochs > 0
                          and not self.from_activations)
        if trained_itself and model.compiled:
            return
        rate = self.rate("fine_tune" if self.schedule.fine_tune_epochs else "head")
        compile_classifier(model, rate, False)

    def _record(self, result: keras.callbacks.History, phase: str) -> None:
        history = self.history.history
        epochs = len(result.epoch)
        for key, values in result.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        history.setdefault("phase", []).extend([phase] * epochs)
        self.history.epoch.extend(result.epoch)


def network_identity(backbone: keras.Model) -> tuple:
    """`(name, preprocessing)` of a `load_backbone` model, for cache keys.

    With the fingerprint of the weights (in `feature_cache_key`) they say what
    computes a feature: the network and the pixel scaling before it.
    """
    from tftransfer.hub import hub_layer

    preprocessing = next((layer.mode for layer in backbone.layers
                          if isinstance(layer, ImagePreprocessing)), "none")
    module = hub_layer(backbone)
    if module is not None:
        return f"hub:{module.handle}", preprocessing
    try:
        return backbone_network(backbone).name, preprocessing
    except ValueError:
        return backbone.name, preprocessing

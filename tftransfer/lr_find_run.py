"""`tftransfer lr-find`: the learning-rate range test on an image folder.

It reads the folder and builds the classifier as `train` would with the same
options, then runs `lr_find` where `train` would train (same dtype policy): on the cached
backbone features for the head phase; for the fine-tuning phase, after
training the head for `--epochs`, on the cached activations below the
unfrozen top. Features and activations go through the on-disk cache, so a
`train` run after it does not compute them again. No run folder is written;
options that only shape a run folder or a cluster (`--output`, `--tflite`,
`--strategy`, `--class-weight`) have no effect.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import keras

from tftransfer.engine import Engine
from tftransfer.examples import FolderExamples
from tftransfer.fusion import build_backbone
from tftransfer.heads import build_classifier
from tftransfer.lr_find import plot_record
from tftransfer.precision import dtype_policy_scope
from tftransfer.run import scan, schedule_of
from tftransfer.settings import TrainConfig

PHASES = ("head", "fine_tune")


def find_learning_rate(config: TrainConfig, phase: str = "head",
                       plot: Optional[str] = None) -> dict:
    """Runs the range test for one phase of the run `config` describes.

    Args:
        config: A `TrainConfig`; its `output` is not written. For the
            fine-tuning phase the head first trains for `config.epochs` epochs
            at `config.learning_rate` (itself found first if `"auto"`).
        phase: `"head"` or `"fine_tune"`. Defaults to `"head"`.
        plot: A PNG to draw the loss against the rate into, or `None`.

    Returns:
        `LRFinderResult.record()` with `phase` and `plot` (the PNG written, or
        `None`).

    Raises:
        ValueError: an unknown `phase`, or `"fine_tune"` with no fine-tuning
            layers to unfreeze.
        DataError: the data folder is unusable.
    """
    phase = phase.replace("-", "_")
    if phase not in PHASES:
        raise ValueError(f"`phase` must be one of head, fine-tune. Received: {phase}")
    with dtype_policy_scope(config.mixed_precision):  # As `train` runs.
        return _find(config, phase, plot)


def _find(config: TrainConfig, phase: str, plot: Optional[str]) -> dict:
    keras.utils.set_random_seed(config.seed)
    backbone = build_backbone(config, config.image_size)
    image_size = int(backbone.input_shape[1])
    folder, _ = scan(config)
    model = build_classifier(backbone, len(folder.class_names), config.dropout)
    examples = FolderExamples(folder, image_size, config.batch_size, config.seed)
    schedule = schedule_of(config)
    # The head's range test needs no activations: no fine-tuning is planned.
    schedule = dataclasses.replace(
        schedule, **({"learning_rate": "auto", "fine_tune_epochs": 0} if phase == "head"
                     else {"fine_tune_learning_rate": "auto",
                           "fine_tune_epochs": max(1, schedule.fine_tune_epochs)}))
    engine = Engine(model, examples, schedule)
    if phase == "head":
        network, train, _ = engine.head_data()
    else:
        engine.head_phase()
        network, train, _ = engine.fine_tune_data()
    engine.find_rate(phase, network, train)
    engine.close()
    record = dict(engine.found[phase], phase=phase, plot=None)
    if plot:
        record["plot"] = plot_record(record, os.fspath(plot))
    return record

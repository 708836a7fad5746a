"""A training run: from an image folder to a run folder with everything a user needs.

Run folder layout (`RUN_DIR`):

    saved_model/      SavedModel for serving (see `export_saved_model`)
    model.keras       the Keras model: pixels 0..255 in, logits out
    labels.txt        class names, one per line, in label order
    history.csv       one row per finished epoch, both phases
    data_report.json  every file considered: used or skipped, and why
    metrics.json      final metrics and settings; written last, so its presence
                      marks a finished run
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Optional

import keras

from tftransfer.backbones import get_backbone_spec, load_backbone
from tftransfer.data import ImageFolder, image_folder_datasets, scan_image_folder
from tftransfer.errors import RunFolderError
from tftransfer.export import export_saved_model, write_labels
from tftransfer.heads import build_classifier
from tftransfer.train import HistoryCSV, fine_tune


@dataclasses.dataclass
class TrainConfig:
    """Settings of `train_run`; the command line's `train` options.

    Args:
        data_dir: Folder of class folders (or of train/ and val/ split folders).
        output: The run folder. Defaults to `saved_models/<data>-<backbone>`.
        backbone: A registered backbone name. Defaults to `"mobilenet_v2"`.
        alpha: MobileNet width multiplier. Defaults to `None`.
        weights: `"imagenet"`, `None` or a weights file. Defaults to `"imagenet"`.
        image_size: Defaults to the backbone's default size.
        epochs: Epochs with the backbone frozen. Defaults to `5`.
        fine_tune_epochs: Epochs with the top of the backbone unfrozen.
            Defaults to `0`.
        fine_tune_layers: Layers to unfreeze. Defaults to the top 30%.
        batch_size: Defaults to `32`.
        learning_rate: Head-phase learning rate. Defaults to `1e-3`.
        augment: Random flips, rotations and zooms of training images.
            Defaults to `False`.
        validation_split: Used when the data has no split folders.
            Defaults to `0.2`.
        seed: Split, shuffling and initialization seed. Defaults to `0`.
        dropout: Head dropout rate. Defaults to `0.2`.
        overwrite: Replace a finished run in `output`. Defaults to `False`.
        verbose: Progress output (`"auto"`, 0, 1, 2). Defaults to `"auto"`.
    """

    data_dir: str
    output: Optional[str] = None
    backbone: str = "mobilenet_v2"
    alpha: Optional[float] = None
    weights: Optional[str] = "imagenet"
    image_size: Optional[int] = None
    epochs: int = 5
    fine_tune_epochs: int = 0
    fine_tune_layers: Optional[int] = None
    batch_size: int = 32
    learning_rate: float = 1e-3
    augment: bool = False
    validation_split: float = 0.2
    seed: int = 0
    dropout: float = 0.2
    overwrite: bool = False
    verbose: object = "auto"

    def __post_init__(self):
        for name in ("epochs", "fine_tune_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"`{name}` must be >= 0. Received: {name}={getattr(self, name)}"
                )
        if self.epochs + self.fine_tune_epochs == 0:
            raise ValueError("Nothing to train: `epochs` and `fine_tune_epochs` are 0.")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1. Received: {self.batch_size}")
        if self.learning_rate <= 0:
            raise ValueError(
                f"`learning_rate` must be > 0. Received: {self.learning_rate}"
            )
        spec = get_backbone_spec(self.backbone)
        self.backbone = spec.name
        self.image_size = int(self.image_size or spec.default_image_size)
        if self.output is None:
            data_name = os.path.basename(os.path.normpath(self.data_dir)) or "data"
            self.output = os.path.join("saved_models", f"{data_name}-{spec.name}")


def augmentation_layers(seed: int = 0) -> keras.Sequential:
    """Random flips, small rotations and zooms, applied in the tf.data pipeline."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.1, seed=seed),
            keras.layers.RandomZoom(0.1, seed=seed),
        ],
        name="augmentation",
    )


def _say(config, message):
    if config.verbose != 0:
        print(message, flush=True)


def _check_run_folder(output: str, overwrite: bool) -> None:
    if os.path.exists(os.path.join(output, "metrics.json")) and not overwrite:
        raise RunFolderError(
            f"{output} holds a finished run already. Nothing was changed. "
            "Pass --overwrite (overwrite=True) to replace it, or choose another "
            "--output."
        )
    if os.path.exists(output) and not os.path.isdir(output):
        raise RunFolderError(f"--output {output} exists and is not a folder.")


def write_json_atomically(path: str, payload) -> None:
    """Writes JSON to a temporary file beside `path`, then renames it into place."""
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    with os.fdopen(handle, "w") as stream:
        json.dump(payload, stream, indent=2)
        stream.write("\n")
    os.replace(tmp, path)


def data_report(folder: ImageFolder) -> dict:
    """What was found in the data folder, as written to `data_report.json`."""
    skipped = {}
    for f in folder.skipped():
        kind = f.reason.split(":")[0].split(" (")[0]
        skipped[kind] = skipped.get(kind, 0) + 1
    by_digest = {}
    for f in folder.files:
        if f.status == "used":
            by_digest.setdefault(f.digest, []).append(f)
    duplicates = []
    for group in by_digest.values():
        splits = {f.split for f in group}
        if len(splits) > 1:
            duplicates.append(
                sorted(os.path.relpath(f.path, folder.root) for f in group)
            )
    return {
        "data_dir": folder.root,
        "layout": folder.layout,
        "class_names": folder.class_names,
        "counts": folder.counts(),
        "skipped": skipped,
        "duplicates_across_splits": duplicates,
        "files": [
            {
                "path": os.path.relpath(f.path, folder.root),
                "class": f.class_name,
                "split": f.split,
                "status": f.status,
                "reason": f.reason,
            }
            for f in folder.files
        ],
    }


def _summarize_data(report: dict) -> str:
    lines = []
    for split, counts in report["counts"].items():
        per_class = ", ".join(f"{name} {count}" for name, count in counts.items())
        lines.append(f"  {split}: {sum(counts.values())} images ({per_class})")
    skipped = sum(report["skipped"].values())
    if skipped:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(report["skipped"].items()))
        lines.append(f"  skipped {skipped} file(s): {kinds}")
        for f in report["files"]:
            if f["status"] == "skipped":
                lines.append(f"    {f['path']}: {f['reason']}")
    if report["duplicates_across_splits"]:
        lines.append(
            f"  warning: {len(report['duplicates_across_splits'])} image(s) "
            "appear in more than one split (identical content)"
        )
    return "\n".join(lines)


def train_run(config: TrainConfig) -> dict:
    """Trains a classifier on an image folder and writes a complete run folder.

    Returns:
        The summary written to `metrics.json`: `val_accuracy`, `seconds`,
        `num_classes`, `class_names`, `saved_model` and more.
    """
    start = time.perf_counter()
    output = os.path.abspath(config.output)
    # Everything that can fail on the user's input fails before anything is written.
    _check_run_folder(output, config.overwrite)
    keras.utils.set_random_seed(config.seed)
    _say(config, f"Checking images in {config.data_dir} ...")
    folder = scan_image_folder(config.data_dir, config.validation_split, config.seed,
                               progress=config.verbose != 0)
    report = data_report(folder)
    _say(config, _summarize_data(report))
    backbone = load_backbone(config.backbone, config.weights, config.image_size,
                             config.alpha)
    weights_used = config.weights if config.weights is not None else "none (random)"
    _say(config, f"Backbone {config.backbone} ({backbone.count_params():,} "
                 f"parameters), weights: {weights_used}, image size {config.image_size}")
    os.makedirs(output, exist_ok=True)
    history_path = os.path.join(output, "history.csv")
    for stale in ("metrics.json", "history.csv"):  # The folder is unfinished now.
        if os.path.exists(os.path.join(output, stale)):
            os.remove(os.path.join(output, stale))
    write_json_atomically(os.path.join(output, "data_report.json"), report)
    model = build_classifier(backbone, len(folder.class_names), config.dropout)
    augment = augmentation_layers(config.seed) if config.augment else None
    data = image_folder_datasets(
        config.data_dir,
        config.image_size,
        config.batch_size,
        seed=config.seed,
        augment=augment,
        folder=folder,
    )
    history = fine_tune(
        model,
        data.train,
        data.validation,
        epochs=config.epochs,
        fine_tune_epochs=config.fine_tune_epochs,
        learning_rate=config.learning_rate,
        fine_tune_layers=config.fine_tune_layers,
        cache_features=not config.augment,
        batch_size=config.batch_size,
        seed=config.seed,
        callbacks_for=lambda phase: [HistoryCSV(history_path, phase)],
        verbose=config.verbose,
    )
    metrics = {
        "val_accuracy": history["val_accuracy"][-1],
        "val_loss": history["val_loss"][-1],
    }
    if data.test is not None:
        model.compile(
            metrics=["accuracy"],
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        test_loss, test_accuracy = model.evaluate(data.test, verbose=0)
        metrics.update(test_accuracy=float(test_accuracy), test_loss=float(test_loss))

    _save_keras_model(model, os.path.join(output, "model.keras"))
    write_labels(os.path.join(output, "labels.txt"), folder.class_names)
    saved_model = export_saved_model(
        model, os.path.join(output, "saved_model"), folder.class_names, overwrite=True
    )
    counts = report["counts"]
    summary = {
        **metrics,
        "seconds": round(time.perf_counter() - start, 2),
        "num_classes": len(folder.class_names),
        "class_names": folder.class_names,
        "num_train": sum(counts.get("train", {}).values()),
        "num_validation": sum(counts.get("validation", {}).values()),
        "num_skipped": len(folder.skipped()),
        "run_dir": output,
        "saved_model": saved_model,
        "model": os.path.join(output, "model.keras"),
        "backbone": config.backbone,
        "alpha": config.alpha,
        "weights": str(config.weights) if config.weights is not None else None,
        "image_size": config.image_size,
        "epochs": config.epochs,
        "fine_tune_epochs": config.fine_tune_epochs,
        "augment": config.augment,
        "history": history,
    }
    write_json_atomically(os.path.join(output, "metrics.json"), summary)
    return summary


def _save_keras_model(model: keras.Model, path: str) -> None:
    tmp = path + ".partial.keras"
    model.save(tmp)
    os.replace(tmp, path)

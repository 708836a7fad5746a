"""tftransfer: transfer learning for image folders with Keras 3 on TensorFlow.

`import tftransfer` imports every public name below, and so registers the
package's Keras layers: `keras.saving.load_model` then reads its models.
Started as the `tftransfer` command, the package imports nothing heavy until
a command runs (`cli.main` then loads it all), so that `--help`, `--version`
and argument errors do not wait seconds for TensorFlow; a name used before
that is imported on first use (PEP 562).
"""

import importlib
import os
import sys
import types

# It notes when the package started importing (see `Timings`).
from tftransfer import timings  # noqa: F401

__version__ = "0.1.0"

# Each public name and the module that defines it.
_EXPORTS = {
    "BackboneSpec": "tftransfer.backbones",
    "DataError": "tftransfer.errors",
    "DistillConfig": "tftransfer.settings",
    "Distiller": "tftransfer.distill",
    "FeatureCache": "tftransfer.cache",
    "ImageFolder": "tftransfer.folders",
    "ImagePreprocessing": "tftransfer.backbones",
    "Interpretation": "tftransfer.interpretation",
    "LRFinderResult": "tftransfer.lr_find",
    "LiteRTModel": "tftransfer.litert",
    "MagnitudePruning": "tftransfer.pruning",
    "ProbabilityAverage": "tftransfer.ensemble",
    "RunConfig": "tftransfer.settings",
    "RunFolderError": "tftransfer.errors",
    "RunResult": "tftransfer.run",
    "ServedModel": "tftransfer.evaluate",
    "SettingError": "tftransfer.errors",
    "TrainConfig": "tftransfer.settings",
    "TransferError": "tftransfer.errors",
    "WeightsUnavailableError": "tftransfer.errors",
    "average_weights": "tftransfer.soup",
    "backbone_names": "tftransfer.backbones",
    "balanced_class_weights": "tftransfer.train",
    "build_classifier": "tftransfer.heads",
    "build_ensemble": "tftransfer.ensemble",
    "build_fused_backbone": "tftransfer.fusion",
    "build_fused_classifier": "tftransfer.fusion",
    "build_head": "tftransfer.heads",
    "check_tflite": "tftransfer.tflite_check",
    "choose_cut": "tftransfer.probe",
    "compute_features": "tftransfer.train",
    "decode_image": "tftransfer.data",
    "cut_points": "tftransfer.probe",
    "default_cache_dir": "tftransfer.cache",
    "distill_run": "tftransfer.distill_run",
    "distillation_loss": "tftransfer.distill",
    "ensemble": "tftransfer.ensemble",
    "distributed_fit": "tftransfer.distribute",
    "evaluate_folder": "tftransfer.evaluate",
    "export_backbone": "tftransfer.hub",
    "export_checked_tflite": "tftransfer.tflite_check",
    "export_saved_model": "tftransfer.export",
    "export_tflite": "tftransfer.tflite",
    "fine_tune": "tftransfer.train",
    "get_backbone_spec": "tftransfer.backbones",
    "image_folder_datasets": "tftransfer.data",
    "load_backbone": "tftransfer.backbones",
    "load_teacher": "tftransfer.teacher",
    "lr_find": "tftransfer.lr_find",
    "make_dataset": "tftransfer.data",
    "make_strategy": "tftransfer.workers",
    "predict_paths": "tftransfer.evaluate",
    "probe_cuts": "tftransfer.probe",
    "prune_filters": "tftransfer.filter_pruning",
    "recalibrate_batch_norm": "tftransfer.pruning",
    "refit_pruned_filters": "tftransfer.filter_pruning",
    "register_backbone": "tftransfer.backbones",
    "scan_image_folder": "tftransfer.folders",
    "soup": "tftransfer.soup",
    "sparsity_report": "tftransfer.pruning",
    "strip_pruning": "tftransfer.pruning",
    "train_run": "tftransfer.run",
    "truncate": "tftransfer.probe",
    "unfreeze_top": "tftransfer.train",
    "write_report": "tftransfer.report",
    "write_run_report": "tftransfer.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tftransfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # Looked up once.
    return value


def __dir__() -> list:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """Keeps `tftransfer.lr_find`, `distill_run`, `ensemble` and `soup` the
    functions.

    Importing a submodule binds it on its package under its own name; these
    public functions share their module's name, and the function must win,
    as it did when the package imported everything at once.
    """

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def load_all() -> None:
    """Imports every public name (and so registers the Keras layers)."""
    for name in _EXPORTS:
        __getattr__(name)


def _started_as_command() -> bool:
    """Whether this process is the `tftransfer` command (its script, or
    `python -m tftransfer`, while Python locates the package's `__main__`)."""
    argv = getattr(sys, "argv", None) or [""]
    name = os.path.basename(argv[0])
    return name in ("tftransfer", "tftransfer.exe") or argv[0] == "-m"


if not _started_as_command():
    load_all()

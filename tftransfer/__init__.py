"""tftransfer: transfer learning for image folders with Keras 3 on TensorFlow."""

# First: it notes when the package started importing (see `Timings`).
import tftransfer.timings  # noqa: F401, I001
from tftransfer.backbones import (
    BackboneSpec,
    ImagePreprocessing,
    backbone_names,
    get_backbone_spec,
    load_backbone,
    register_backbone,
)
from tftransfer.cache import FeatureCache, default_cache_dir
from tftransfer.data import decode_image, image_folder_datasets, make_dataset
from tftransfer.distill import Distiller, distillation_loss
from tftransfer.distill_run import distill_run
from tftransfer.distribute import distributed_fit
from tftransfer.errors import (
    DataError,
    RunFolderError,
    SettingError,
    TransferError,
    WeightsUnavailableError,
)
from tftransfer.evaluate import ServedModel, evaluate_folder, predict_paths
from tftransfer.export import export_saved_model
from tftransfer.folders import ImageFolder, scan_image_folder
from tftransfer.heads import build_classifier, build_head
from tftransfer.hub import export_backbone
from tftransfer.interpretation import Interpretation
from tftransfer.litert import LiteRTModel
from tftransfer.lr_find import LRFinderResult, lr_find
from tftransfer.report import write_report, write_run_report
from tftransfer.run import RunResult, train_run
from tftransfer.settings import DistillConfig, RunConfig, TrainConfig
from tftransfer.teacher import load_teacher
from tftransfer.tflite import export_tflite
from tftransfer.tflite_check import check_tflite, export_checked_tflite
from tftransfer.train import (
    balanced_class_weights,
    compute_features,
    fine_tune,
    unfreeze_top,
)
from tftransfer.workers import make_strategy

__version__ = "0.1.0"

__all__ = [
    "BackboneSpec",
    "DataError",
    "DistillConfig",
    "Distiller",
    "FeatureCache",
    "ImageFolder",
    "ImagePreprocessing",
    "Interpretation",
    "LRFinderResult",
    "LiteRTModel",
    "RunConfig",
    "RunFolderError",
    "RunResult",
    "ServedModel",
    "SettingError",
    "TrainConfig",
    "TransferError",
    "WeightsUnavailableError",
    "backbone_names",
    "balanced_class_weights",
    "build_classifier",
    "build_head",
    "check_tflite",
    "compute_features",
    "decode_image",
    "default_cache_dir",
    "distill_run",
    "distillation_loss",
    "distributed_fit",
    "evaluate_folder",
    "export_checked_tflite",
    "export_backbone",
    "export_saved_model",
    "export_tflite",
    "fine_tune",
    "get_backbone_spec",
    "image_folder_datasets",
    "load_backbone",
    "load_teacher",
    "lr_find",
    "make_dataset",
    "make_strategy",
    "write_report",
    "write_run_report",
    "predict_paths",
    "register_backbone",
    "scan_image_folder",
    "train_run",
    "unfreeze_top",
]

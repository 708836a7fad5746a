"""tftransfer: transfer learning for image folders with Keras 3 on TensorFlow."""

from tftransfer.backbones import (
    BackboneSpec,
    ImagePreprocessing,
    backbone_names,
    get_backbone_spec,
    load_backbone,
    register_backbone,
    split_backbone,
)
from tftransfer.cache import FeatureCache, cached_outputs, default_cache_dir
from tftransfer.data import (
    ImageFolder,
    decode_image,
    image_folder_datasets,
    make_dataset,
    scan_image_folder,
)
from tftransfer.distill import Distiller, distillation_loss
from tftransfer.distill_run import DistillConfig, distill_run, load_teacher
from tftransfer.distribute import Workers, distributed_fit, make_strategy
from tftransfer.errors import (
    DataError,
    RunFolderError,
    TransferError,
    WeightsUnavailableError,
)
from tftransfer.evaluate import ServedModel, evaluate_folder, predict_paths
from tftransfer.export import export_saved_model, export_tflite
from tftransfer.heads import build_classifier, build_head
from tftransfer.run import TrainConfig, train_run
from tftransfer.train import (
    balanced_class_weights,
    compute_features,
    fine_tune,
    unfreeze_top,
)

__version__ = "0.1.0"

__all__ = [
    "BackboneSpec",
    "DataError",
    "DistillConfig",
    "Distiller",
    "FeatureCache",
    "ImageFolder",
    "ImagePreprocessing",
    "RunFolderError",
    "ServedModel",
    "TrainConfig",
    "TransferError",
    "WeightsUnavailableError",
    "Workers",
    "backbone_names",
    "balanced_class_weights",
    "build_classifier",
    "build_head",
    "cached_outputs",
    "compute_features",
    "decode_image",
    "default_cache_dir",
    "distill_run",
    "distillation_loss",
    "distributed_fit",
    "evaluate_folder",
    "export_saved_model",
    "export_tflite",
    "fine_tune",
    "get_backbone_spec",
    "image_folder_datasets",
    "load_backbone",
    "load_teacher",
    "make_dataset",
    "make_strategy",
    "predict_paths",
    "register_backbone",
    "scan_image_folder",
    "split_backbone",
    "train_run",
    "unfreeze_top",
]

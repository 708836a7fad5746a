"""tftransfer: transfer learning for image folders with Keras 3 on TensorFlow."""

from tftransfer.backbones import (
    BackboneSpec,
    ImagePreprocessing,
    backbone_names,
    get_backbone_spec,
    load_backbone,
    register_backbone,
)
from tftransfer.data import (
    ImageFolder,
    decode_image,
    image_folder_datasets,
    make_dataset,
    scan_image_folder,
)
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
from tftransfer.train import compute_features, fine_tune, unfreeze_top

__version__ = "0.1.0"

__all__ = [
    "BackboneSpec",
    "DataError",
    "ImageFolder",
    "ImagePreprocessing",
    "RunFolderError",
    "ServedModel",
    "TrainConfig",
    "TransferError",
    "WeightsUnavailableError",
    "backbone_names",
    "build_classifier",
    "build_head",
    "compute_features",
    "decode_image",
    "evaluate_folder",
    "export_saved_model",
    "export_tflite",
    "fine_tune",
    "get_backbone_spec",
    "image_folder_datasets",
    "load_backbone",
    "make_dataset",
    "predict_paths",
    "register_backbone",
    "scan_image_folder",
    "train_run",
    "unfreeze_top",
]

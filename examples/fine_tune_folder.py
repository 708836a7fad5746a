"""Fine-tune a backbone on an image folder and export it for serving.

Usage: python examples/fine_tune_folder.py DATA_DIR [OUTPUT]
"""

import sys

import tftransfer

data_dir = sys.argv[1]
output = sys.argv[2] if len(sys.argv) > 2 else "saved_models/example"

data = tftransfer.image_folder_datasets(data_dir, image_size=224)
backbone = tftransfer.load_backbone("mobilenet_v2", weights="imagenet", alpha=0.35)
model = tftransfer.build_classifier(backbone, num_classes=len(data.class_names))
history = tftransfer.fine_tune(model, data.train, data.validation, epochs=5,
                               fine_tune_epochs=1)
print(f"val_accuracy {history.history['val_accuracy'][-1]:.3f}")
tftransfer.export_saved_model(model, output, data.class_names, overwrite=True)
print(f"SavedModel written to {output}")

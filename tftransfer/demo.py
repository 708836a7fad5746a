"""The built-in demo: generate a small image folder, train, export, serve.

It needs no network and no data: the images are drawn here. It uses ImageNet
weights when Keras can find or download them, and random weights otherwise,
and says which.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from tftransfer.errors import RunFolderError, WeightsUnavailableError
from tftransfer.evaluate import predict_paths
from tftransfer.run import TrainConfig, train_run

DEMO_CLASSES = ("desert", "forest", "ocean")
_MARKER = ".tftransfer-demo"


def write_demo_images(
    folder: str, images_per_class: int = 30, image_size: int = 96, seed: int = 0
) -> str:
    """Writes JPEGs of three generated scene types, one folder per class.

    Each class has its own colour palette and texture (dunes, leaves, waves), with
    random variation, so a classifier has something real but easy to learn.

    Returns:
        `folder`.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:image_size, 0:image_size] / image_size
    for name in DEMO_CLASSES:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for index in range(images_per_class):
            phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(3, 8)
            if name == "desert":
                wave = np.sin(freq * (rows + 0.3 * np.sin(4 * cols)) * np.pi + phase)
                base = np.array([0.85, 0.7, 0.4])
            elif name == "forest":
                wave = rng.normal(0, 1, (image_size, image_size))
                base = np.array([0.15, 0.45, 0.15])
            else:
                wave = np.sin(freq * (cols + 0.2 * np.sin(6 * rows)) * np.pi + phase)
                base = np.array([0.1, 0.3, 0.7])
            tint = base + rng.normal(0, 0.05, 3)
            image = (
                tint + 0.12 * wave[..., None] + rng.normal(0, 0.03, (*wave.shape, 3))
            )
            pixels = np.clip(image * 255, 0, 255).astype("uint8")
            path = os.path.join(folder, name, f"{name}_{index:03d}.jpg")
            tf.io.write_file(path, tf.io.encode_jpeg(pixels, quality=90))
    return folder


def run_demo(output: str = "tftransfer-demo", verbose="auto") -> dict:
    """Runs the whole main job on generated data and returns what it produced.

    Args:
        output: Folder for the demo's data and run folder. Defaults to
            `"tftransfer-demo"`.
        verbose: Progress output. Defaults to `"auto"`.

    Returns:
        A dict with the training summary (`train`), the predictions made through
        the exported SavedModel (`predictions`) and the paths written.
    """
    output = os.path.abspath(output)
    if os.path.exists(output) and not os.path.exists(os.path.join(output, _MARKER)):
        raise RunFolderError(
            f"{output} exists and was not made by the demo; nothing was changed. "
            "Pass another folder with --output."
        )
    os.makedirs(output, exist_ok=True)
    open(os.path.join(output, _MARKER), "w").close()
    data_dir = write_demo_images(os.path.join(output, "data"))
    run_dir = os.path.join(output, "run")
    settings = dict(
        data_dir=data_dir, output=run_dir, epochs=15, overwrite=True, verbose=verbose
    )
    try:
        summary = train_run(
            TrainConfig(
                backbone="mobilenet_v2",
                alpha=0.35,
                weights="imagenet",
                image_size=224,
                **settings,
            )
        ).summary
    except WeightsUnavailableError as error:
        # A randomly initialized MobileNet's features are degenerate (of the
        # order of 1e-11) and useless to a frozen-backbone head; a random
        # ResNet50's still separate these generated scenes.
        print(
            f"{str(error).splitlines()[0]}\nThe demo continues without ImageNet "
            "weights: ResNet50 with random weights (--weights none) at 64 px.",
            flush=True,
        )
        summary = train_run(
            TrainConfig(backbone="resnet50", weights=None, image_size=64, **settings)
        ).summary
    samples = [os.path.join(data_dir, name, f"{name}_000.jpg") for name in DEMO_CLASSES]
    predictions = predict_paths(summary["saved_model"], samples, top_k=1)
    return {
        "train": summary,
        "predictions": predictions,
        "data_dir": data_dir,
        "run_dir": run_dir,
    }

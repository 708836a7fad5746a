"""Is the input pipeline the bottleneck? Image files against the same batches in memory.

tftransfer reads images with `tf.data` (parallel decoding, AUTOTUNE, prefetch;
`data.make_dataset`). Each job below runs, in one process and in alternating
rounds, from these sources:

  memory        the very same images, decoded beforehand and held in memory:
                the ceiling
  files         tftransfer's pipeline as `image_folder_datasets` builds it: the
                first epoch decodes the files, later epochs replay the decoded
                images kept in memory (when they fit in 1 GiB)
  files, every epoch
                decoding the files every epoch, as for a split too big to keep

for the two jobs that read images:

  forward      the frozen backbone once over every image (how features and
               activations for the cache are computed)
  fine-tune    `fit` for --epochs epochs of the classifier with the top 30% of
               the backbone unfrozen (training on images: `--augment`, or a
               backbone whose graph cannot be cut); the pipeline is rebuilt for
               every timed `fit`, so each includes its first, decoding epoch

The target is files >= 90% of memory throughput. Medians of the rounds.

Usage:
  python benchmarks/input_pipeline.py ../shared/data/hymenoptera \
      [--backbone mobilenet_v2 --alpha 0.35 --image-size 224 --rounds 3]
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tftransfer.backbones import load_backbone  # noqa: E402
from tftransfer.data import make_dataset  # noqa: E402
from tftransfer.folders import scan_image_folder  # noqa: E402
from tftransfer.heads import build_classifier  # noqa: E402
from tftransfer.train import (  # noqa: E402
    compile_classifier,
    default_fine_tune_layers,
    unfreeze_top,
)


def in_memory(dataset, batch_size, shuffle):
    """The dataset's images, decoded now, replayed from memory in batches."""
    batches = [batch for batch in dataset]
    pixels = tf.concat([b[0] for b in batches], 0)
    labels = tf.concat([b[1] for b in batches], 0)
    memory = tf.data.Dataset.from_tensor_slices((pixels, labels))
    if shuffle:
        memory = memory.shuffle(len(labels), seed=0, reshuffle_each_iteration=True)
    return memory.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--alpha", type=float, default=0.35)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = scan_image_folder(args.data_dir)
    paths, labels = folder.paths_and_labels("train")
    count = len(paths)
    print(f"{count} training images of {args.data_dir}, {args.backbone} "
          f"alpha {args.alpha}, {args.image_size} px, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs", flush=True)

    def files(shuffle, keep):
        return make_dataset(paths, labels, args.image_size, args.batch_size,
                            shuffle=shuffle, seed=0, keep_decoded=keep)

    memory = {shuffle: in_memory(files(False, False), args.batch_size, shuffle)
              for shuffle in (False, True)}
    backbone = load_backbone(args.backbone, None, args.image_size, args.alpha)
    forward = tf.function(lambda x: backbone(x, training=False))

    def run_forward(dataset):
        for pixels, _ in dataset:
            forward(pixels).numpy()

    keras.utils.set_random_seed(0)
    model = build_classifier(
        load_backbone(args.backbone, None, args.image_size, args.alpha),
        len(folder.class_names))
    unfreeze_top(model.get_layer("backbone"),
                 default_fine_tune_layers(model.get_layer("backbone")))
    compile_classifier(model, 1e-4)

    def run_fit(dataset):
        model.fit(dataset, epochs=args.epochs, verbose=0)

    jobs = {
        "forward": (run_forward, 1, {
            "memory": lambda: memory[False],
            "files": lambda: files(False, False),
        }),
        "fine-tune": (run_fit, args.epochs, {
            "memory": lambda: memory[True],
            "files": lambda: files(True, True),
            "files, every epoch": lambda: files(True, False),
        }),
    }
    results = {}
    for job, (run, epochs, sources) in jobs.items():
        for make in sources.values():  # Warm-up: tracing, first-epoch setup.
            run(make())
        times = {name: [] for name in sources}
        for _ in range(args.rounds):
            for name, make in sources.items():
                dataset = make()
                start = time.perf_counter()
                run(dataset)
                times[name].append(time.perf_counter() - start)
        speed = {name: count * epochs / statistics.median(t)
                 for name, t in times.items()}
        results[job] = {"epochs": epochs}
        for name in sources:
            ratio = speed[name] / speed["memory"]
            results[job][name] = {"images_per_s": round(speed[name], 1),
                                  "ratio_to_memory": round(ratio, 3)}
            print(f"{job:<10} {name:<20} {speed[name]:7.1f} images/s  "
                  f"{ratio:.3f} of memory", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

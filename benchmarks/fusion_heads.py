"""How to join two backbones' features: heads over each member alone and over
several normalisations of their fusion, 5 seeds each, on cached features.

The members are MobileNet 0.75 and MobileNetV2 0.35 (ImageNet weights,
224 px); the folder is laid out with a held-out `test/` as in
`benchmarks/fusion.py`. Features come through tftransfer's cache (a fusion
engine's member caches), so a second run costs seconds. Each head is
`train`'s: Dropout 0.2 and a Dense layer, Adam at 1e-2, 5 epochs, batch 32.
The seed changes the head's initialisation, dropout and shuffling: one run per
model (as `benchmarks/fusion.py`) differs by a few test images from seed to
seed, so the means over seeds say which joining is better.

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/fusion_heads.py \
      ../shared/data/cats_and_dogs CACHE_DIR
"""
import json
import os
import sys
import tempfile

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fusion import held_out_layout  # noqa: E402  (a sibling script)

from tftransfer import TrainConfig  # noqa: E402
from tftransfer.engine import Engine  # noqa: E402
from tftransfer.examples import FolderExamples  # noqa: E402
from tftransfer.fusion import build_backbone  # noqa: E402
from tftransfer.heads import build_classifier  # noqa: E402
from tftransfer.run import scan, schedule_of  # noqa: E402

data = held_out_layout(sys.argv[1], os.path.join(tempfile.mkdtemp(), "data"))
cache = sys.argv[2]
config = TrainConfig(data, backbone="mobilenet:alpha=0.75,mobilenet_v2:alpha=0.35",
                     cache_dir=cache, verbose=0, report=False)
folder, _ = scan(config)
model = build_classifier(build_backbone(config, 224), len(folder.class_names))
examples = FolderExamples(folder, 224, 32, 0)
engine = Engine(model, examples, schedule_of(config))
raw = {s: [engine.outputs(m, c, s, "forward", image_size=224)
           for m, c in zip(engine.members, engine.member_caches())]
       for s in ("train", "validation", "test")}
labels = {s: examples.labels(s) for s in raw}
print({s: [a.shape for a in v] for s, v in raw.items()}, engine.stats)

def unit(x): return x / np.linalg.norm(x, axis=1, keepdims=True)
mean_w = np.mean([a.shape[1] for a in raw["train"]])
stats = [(a.mean(0), a.std(0) + 1e-6) for a in raw["train"]]
variants = {
    "member0": lambda p: p[0],
    "member1": lambda p: p[1],
    "unit*sqrt(mean width)": lambda p: np.concatenate([unit(a) * np.sqrt(mean_w) for a in p], 1),
    "raw concat": lambda p: np.concatenate(p, 1),
    "standardised": lambda p: np.concatenate([(a - m) / s for a, (m, s) in zip(p, stats)], 1),
    "standardised/sqrt(width)": lambda p: np.concatenate([(a - m) / s * np.sqrt(mean_w / a.shape[1]) for a, (m, s) in zip(p, stats)], 1),
    "rms per member": lambda p: np.concatenate([a / np.sqrt((a**2).mean(1, keepdims=True)) for a in p], 1),
}
results = {}
for name, f in variants.items():
    xs = {s: f(raw[s]).astype("float32") for s in raw}
    accs = []
    for seed in range(5):
        keras.utils.set_random_seed(seed)
        head = keras.Sequential([keras.Input((xs["train"].shape[1],)), keras.layers.Dropout(0.2), keras.layers.Dense(len(folder.class_names))])
        head.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        head.fit(xs["train"], labels["train"], batch_size=32, epochs=5, verbose=0, shuffle=True)
        accs.append([head.evaluate(xs[s], labels[s], verbose=0)[1] for s in ("validation", "test")])
    accs = np.array(accs)
    results[name] = accs.mean(0).round(4).tolist()
    print(f"{name:28s} val {accs[:,0].mean():.4f} test {accs[:,1].mean():.4f} (test min {accs[:,1].min():.4f} max {accs[:,1].max():.4f})", flush=True)
print(json.dumps(results))

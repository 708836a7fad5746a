"""`tftransfer probe` and `train --cut`: probing an image folder's cut points.

The probe reads the folder and builds the backbone as `train` would with the
same options, then runs `probe_examples`: one forward pass over the training
and validation images yields every cut's pooled features. Each cut's features
are cached under the key a run of the backbone cut there uses, so a
`train --cut LAYER` after the probe computes no feature, and the last cut's
are those of the whole backbone. `cut_backbone` is what a run with `--cut`
calls before it builds its head.
"""

from __future__ import annotations

import csv
import io
import time
from typing import Optional

import keras

from tftransfer.cache import feature_cache_key, open_cache
from tftransfer.engine import network_identity
from tftransfer.examples import FolderExamples
from tftransfer.files import write_atomically
from tftransfer.fusion import build_backbone
from tftransfer.precision import dtype_policy_scope
from tftransfer.probe import (
    _check_layer,
    choose_cut,
    cut_points,
    probe_examples,
    truncate,
)
from tftransfer.settings import TrainConfig
from tftransfer.train import jit_for

COLUMNS = ("layer", "layers", "params", "madds", "latency_ms", "val_accuracy",
           "cv_accuracy")
PROBE_FILE = "probe.json"  # In a run folder: the probe `--cut auto` chose by.


def cache_opener(config, image_size: int):
    """`cache_for(backbone)`: the feature cache a run of `backbone` uses, as
    `Engine.open_cache` opens it, or `None` without a cache."""
    from tftransfer.cache import default_cache_dir

    directory = (config.cache_dir or default_cache_dir()) if config.cache else None
    if directory is None or getattr(config, "augment", False):
        return None

    def cache_for(backbone):
        name, preprocessing = network_identity(backbone)
        key = feature_cache_key(backbone, name, image_size, preprocessing)
        return open_cache(directory, key, verbose=config.verbose != 0)

    return cache_for


def probe_backbone(config: TrainConfig, backbone: keras.Model, folder) -> dict:
    """Probes the cut points of `backbone` on a scanned `folder`; returns the
    record `tftransfer probe --json` prints (see `probe_folder`)."""
    start = time.perf_counter()
    image_size = int(backbone.input_shape[1])
    examples = FolderExamples(folder, image_size, config.batch_size, config.seed)
    if config.verbose != 0:
        print("Probing every cut point: one pass over the images, a linear head "
              "per cut ...", flush=True)
    cuts, stats = probe_examples(
        backbone, examples, cache_opener(config, image_size), seed=config.seed,
        jit_compile=jit_for(config.jit, backbone), verbose=config.verbose)
    chosen = choose_cut(cuts, config.cut_tolerance)
    best = max(cuts, key=lambda cut: cut["cv_accuracy"])
    return {
        "backbone": config.backbone,
        "alpha": config.alpha,
        "image_size": image_size,
        "cut": chosen["layer"],
        "cut_tolerance": config.cut_tolerance,
        "best": best["layer"],
        "cuts": cuts,
        "features": stats,
        "seconds": round(time.perf_counter() - start, 2),
    }


def probe_folder(config: TrainConfig) -> dict:
    """`tftransfer probe`: a linear head at each cut point of the backbone.

    Args:
        config: A `TrainConfig`: the data, backbone, weights, image size,
            cache and `cut_tolerance`. No run folder is written.

    Returns:
        `{"cuts": [...], "cut": layer, "best": layer, ...}`: per cut point its
        `layer`, `layers` and `params` kept, `madds`, `latency_ms` and
        `val_accuracy`; `cut` is what `--cut auto` would take.

    Raises:
        ValueError: a backbone that cannot be cut (a hub module, a fusion).
        DataError: the data folder is unusable.
    """
    from tftransfer.run import scan

    with dtype_policy_scope(config.mixed_precision):
        keras.utils.set_random_seed(config.seed)
        backbone = build_backbone(config, config.image_size)
        cut_points(backbone)  # A backbone that cannot be cut fails before the scan.
        folder, _ = scan(config)
        return probe_backbone(config, backbone, folder)


def cut_backbone(config, backbone: keras.Model, folder, run_folder) -> tuple:
    """`train --cut`: `(backbone cut as asked, probe record or None)`.

    `auto` probes (the features come from the cache after a `probe`); a
    resumed run takes the cut its first start chose, kept in the run folder.
    """
    cut = getattr(config, "cut", None)
    if not cut:
        return backbone, None
    if cut != "auto":
        return truncate(backbone, cut), {"cut": cut}
    record = None if config.overwrite else run_folder.read_json(PROBE_FILE)
    if record is None:
        record = probe_backbone(config, backbone, folder)
    elif config.verbose != 0:
        print(f"Cut chosen when the run started: {record['cut']}", flush=True)
    return truncate(backbone, record["cut"]), record


def check_cut_layer(config, backbone: keras.Model) -> None:
    """Refuses a `--cut LAYER` the network does not have, before the scan."""
    cut = getattr(config, "cut", None)
    if cut and cut != "auto":
        try:
            _check_layer(backbone, cut)
        except ValueError as error:
            from tftransfer.errors import SettingError

            raise SettingError(str(error)) from error


def table_text(cuts: list) -> str:
    """The probe's table as CSV."""
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for cut in cuts:
        writer.writerow({column: cut[column] for column in COLUMNS})
    return text.getvalue()


def write_table(path: str, cuts: list) -> str:
    """Writes the probe's table as CSV to `path` (atomically); returns it."""
    text = table_text(cuts)
    write_atomically(path, lambda stream: stream.write(text), text=True)
    return path


def table_lines(record: dict) -> list:
    """The probe's table for a terminal, the chosen and best cuts marked."""
    lines = [f"{'cut after layer':<28}{'layers':>7}{'params':>12}{'M madds':>10}"
             f"{'ms/image':>10}{'val acc':>9}{'cv acc':>8}"]
    for cut in record["cuts"]:
        mark = ("  <- --cut auto" if cut["layer"] == record["cut"] else
                "  <- best" if cut["layer"] == record["best"] else "")
        latency = "-" if cut["latency_ms"] is None else f"{cut['latency_ms']:.1f}"
        lines.append(f"{cut['layer']:<28}{cut['layers']:>7}{cut['params']:>12,}"
                     f"{cut['madds'] / 1e6:>10.1f}{latency:>10}"
                     f"{cut['val_accuracy']:>9.3f}{cut['cv_accuracy']:>8.3f}{mark}")
    return lines


def summary_of(record: Optional[dict]) -> Optional[dict]:
    """What a run's summary says of its cut."""
    if record is None:
        return None
    chosen = next((cut for cut in record.get("cuts", ())
                   if cut["layer"] == record["cut"]), None)
    return {"layer": record["cut"], "tolerance": record.get("cut_tolerance"),
            "best": record.get("best"), "probe": chosen,
            "probe_seconds": record.get("seconds")}

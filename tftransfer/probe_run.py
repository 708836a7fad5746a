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
import os
import time
from typing import Optional

import keras

from tftransfer.cache import feature_cache_key, open_cache, store_or_drop
from tftransfer.engine import network_identity
from tftransfer.examples import FolderExamples
from tftransfer.files import write_atomically
from tftransfer.fusion import build_backbone
from tftransfer.graph import backbone_network
from tftransfer.precision import dtype_policy_scope
from tftransfer.probe import (
    _check_layer,
    choose_cut,
    cut_points,
    cut_widths,
    probe_examples,
    truncate,
)
from tftransfer.run_folder import PROBE_FILE
from tftransfer.settings import TrainConfig
from tftransfer.train import jit_for

COLUMNS = ("layer", "layers", "params", "madds", "latency_ms", "val_accuracy",
           "cv_accuracy")


def cache_opener(config, image_size: int):
    """`cache_for(backbone, existing=False, **extra)`: the feature cache a run
    of `backbone` uses, as `Engine.open_cache` opens it (`extra` joins the
    key), or `None` without a cache; with `existing`, `None` also when the
    cache has no folder yet."""
    from tftransfer.cache import cache_folder, default_cache_dir

    directory = (config.cache_dir or default_cache_dir()) if config.cache else None
    if directory is None or getattr(config, "augment", False):
        return None

    def cache_for(backbone, existing=False, **extra):
        name, preprocessing = network_identity(backbone)
        key = feature_cache_key(backbone, name, image_size, preprocessing, **extra)
        if existing and not os.path.isdir(cache_folder(directory, key)):
            return None
        return open_cache(directory, key, verbose=config.verbose != 0)

    return cache_for


def fill_cut_cache(config, backbone: keras.Model, cut_network: keras.Model,
                   layer: str, folder) -> int:
    """Copies the probe's features at `layer` into the cache a run of
    `cut_network` (`truncate(backbone, layer)`) reads, for each used file of
    `folder` the probe's entries hold and that cache lacks. The probe keeps all cuts of an image
    in one entry (`probe_examples`); a run reads its cut's alone.

    Returns:
        The entries written.
    """
    cache_for = cache_opener(config, int(backbone.input_shape[1]))
    if cache_for is None:
        return 0
    layers = cut_points(backbone)
    probed = cache_for(backbone, existing=True, probe_cuts=layers)
    if probed is None:
        return 0
    target = cache_for(cut_network)
    if target is None:
        return 0
    index = layers.index(layer)
    widths = cut_widths(backbone, layers)
    begin = sum(widths[:index])
    written = 0
    digests = {f.digest for split in ("train", "validation", "test")
               for f in folder.used(split)}
    for digest in sorted(digests):
        if os.path.exists(target.path(digest)):
            continue
        joined = probed.load(digest)[0]
        if joined is not None and joined.shape == (sum(widths),):
            target = store_or_drop(target, digest, joined[begin:begin + widths[index]])
            if target is None:  # The cache cannot be written: the run computes.
                break
            written += 1
    if written and config.verbose != 0:
        print(f"Features at {layer}: {written} copied from the probe's cache",
              flush=True)
    return written


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
        `layer`, `layers` and `params` kept, `madds`, `latency_ms`,
        `val_accuracy` and `cv_accuracy`; `cut` is what `--cut auto` would
        take (by `cv_accuracy`), `best` the cut of the best `cv_accuracy`.

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

    `auto` probes (the features come from the cache after a `probe`). A run
    resuming from a checkpoint takes the cut its first start chose, kept in
    the run folder, if that probe was of the same backbone, size and
    tolerance; a run starting afresh probes again.
    """
    cut = getattr(config, "cut", None)
    if not cut:
        return backbone, None
    if cut != "auto":
        cut_network = truncate(backbone, cut)
        fill_cut_cache(config, backbone, cut_network, cut, folder)
        return cut_network, {"cut": cut}
    record = _saved_probe(config, backbone, run_folder)
    if record is None:
        record = probe_backbone(config, backbone, folder)
    elif config.verbose != 0:
        print(f"Cut chosen when the run started: {record['cut']}", flush=True)
    cut_network = truncate(backbone, record["cut"])
    _check_fine_tune_layers(config, cut_network, record["cut"])
    fill_cut_cache(config, backbone, cut_network, record["cut"], folder)
    return cut_network, record


def _saved_probe(config, backbone: keras.Model, run_folder) -> Optional[dict]:
    """The probe a killed run with a checkpoint chose its cut by, if it fits."""
    from tftransfer.checkpoint import CHECKPOINT_FILE

    if config.overwrite or not os.path.exists(run_folder.file(CHECKPOINT_FILE)):
        return None
    record = run_folder.read_json(PROBE_FILE)
    if not record or "cuts" not in record:
        return None
    same = (record.get("backbone") == config.backbone
            and record.get("alpha") == config.alpha
            and record.get("image_size") == int(backbone.input_shape[1])
            and record.get("cut_tolerance") == config.cut_tolerance)
    return record if same else None


def _check_fine_tune_layers(config, network: keras.Model, layer: str) -> None:
    """`--fine-tune-layers` must fit the network kept above the cut."""
    from tftransfer.errors import SettingError

    kept = len(backbone_network(network).layers)
    if config.fine_tune_layers is not None and config.fine_tune_layers > kept:
        raise SettingError(
            f"`fine_tune_layers` must be at most {kept}, the layers of the network "
            f"cut after {layer}. Received: fine_tune_layers={config.fine_tune_layers}."
            " Pass a smaller --fine-tune-layers, or leave it out (the top 30%).")


def check_cut_layer(config, backbone: keras.Model) -> None:
    """Refuses, before the scan, a `--cut LAYER` the network does not have
    or `--fine-tune-layers` more than the cut network holds."""
    cut = getattr(config, "cut", None)
    if cut and cut != "auto":
        try:
            _check_layer(backbone, cut)
        except ValueError as error:
            from tftransfer.errors import SettingError

            raise SettingError(str(error)) from error
        _check_fine_tune_layers(config, truncate(backbone, cut), cut)


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

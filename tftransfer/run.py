"""A run: from an image folder (or `tf.data` batches) to a finished run folder.

`execute` is the driver `train_run` and `distill_run` share: it makes the
strategy, takes and checks the run folder (`RunFolder`), scans the images,
resumes a killed run, builds the model, hands it to the phase engine
(`Engine`), evaluates, exports and writes the summary. A command only declares
its task (`ClassifierTask` here, `DistillTask` in `distill_run`).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple, Optional

import keras
import tensorflow as tf

from tftransfer.cache import default_cache_dir, weights_fingerprint
from tftransfer.data import DECODED_CACHE_BYTES
from tftransfer.data_report import class_imbalance, data_report, summarize_data
from tftransfer.engine import ClassifierTask, Engine, Schedule, network_identity
from tftransfer.errors import SettingError
from tftransfer.examples import FolderExamples
from tftransfer.folders import ImageFolder, scan_image_folder
from tftransfer.fusion import build_backbone
from tftransfer.heads import build_classifier, evaluate_classifier, plain_copy
from tftransfer.interpretation import PREDICTIONS_FILE, Interpretation
from tftransfer.precision import dtype_policy_scope
from tftransfer.probe import truncate
from tftransfer.probe_run import PROBE_FILE, check_cut_layer, cut_backbone
from tftransfer.probe_run import summary_of as cut_summary
from tftransfer.report import REPORT_FOLDER
from tftransfer.run_folder import RunFolder
from tftransfer.settings import MAX_SERVING_PIXELS, RunConfig, TrainConfig
from tftransfer.tensorboard import LOGS_FOLDER, write_run_summary
from tftransfer.timings import Timings
from tftransfer.train import balanced_class_weights
from tftransfer.workers import Workers, make_strategy

IMBALANCE_WARNING = 5.0  # Largest to smallest class ratio that earns a warning.


@dataclasses.dataclass
class RunResult:
    """What `train_run` and `distill_run` return.

    Attributes:
        model: The trained classifier, a plain compiled `keras.Model` (pixels
            0..255 in, logits out): `evaluate` and `predict` work on it.
        history: A `keras.callbacks.History` over both phases, with a `phase`
            entry per epoch (epochs before a resume included).
        summary: What `metrics.json` holds (and `--json` prints).
        path: The run folder.

    Example:

    Its fields (`train_run`'s example makes one from a real run):

    >>> [field.name for field in dataclasses.fields(RunResult)]
    ['model', 'history', 'summary', 'path']
    >>> import keras
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> result = RunResult(model, keras.callbacks.History(),
    ...                    {"val_accuracy": 1.0}, "saved_models/run")
    >>> result.summary["val_accuracy"], result.path
    (1.0, 'saved_models/run')
    """

    model: keras.Model
    history: keras.callbacks.History
    summary: dict
    path: str


def augmentation_layers(seed: int = 0) -> keras.Sequential:
    """Random flips, small rotations and zooms, applied in the tf.data pipeline."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.1, seed=seed),
            keras.layers.RandomZoom(0.1, seed=seed),
        ],
        name="augmentation",
    )


def say(config, message: str) -> None:
    if config.verbose != 0:
        print(message, flush=True)


def schedule_of(config: RunConfig) -> Schedule:
    """The `Schedule` of a run's settings."""
    augment = bool(getattr(config, "augment", False))
    return Schedule(
        config.epochs, config.fine_tune_epochs, config.fine_tune_layers,
        config.learning_rate, config.fine_tune_learning_rate, config.batch_size,
        config.seed, config.jit, augment=augment,
        cache_dir=(config.cache_dir or default_cache_dir()) if config.cache else None,
        verbose=config.verbose, lr_decay=config.lr_decay,
        fine_tune_warmup=config.fine_tune_warmup, prune=getattr(config, "prune", None),
        fine_tune_ema=config.fine_tune_ema)


class Declaration(NamedTuple):
    """What a command declares to `execute`.

    Attributes:
        task: What trains (`ClassifierTask`, `DistillTask`).
        image_size: The side images are resized to.
        settings: Settings beyond the config's that a resumed run must share.
        check_data: `callable(folder, report)` run once the images are
            scanned, to refuse or warn about the data.
    """

    task: object
    image_size: int
    settings: dict
    check_data: Callable


def execute(config: RunConfig, declare: Callable) -> RunResult:
    """Runs `config` with the `Declaration` that `declare(config)` returns.

    The backbone is built before the images are scanned, so that missing
    weights fail at once, not after a scan of the whole folder. The
    strategy is made first, since a multi-worker strategy must configure
    TensorFlow before it runs anything. The dtype policy of
    `config.mixed_precision` holds while the run builds and trains, and the
    previous global policy is restored afterwards.
    """
    workers = Workers.of(make_strategy(config.strategy))
    with dtype_policy_scope(config.mixed_precision) as policy, \
            workers.reporting_lost_peers():
        worker = None if workers.is_chief else workers.index
        with RunFolder(config.output, config.overwrite, worker) as run_folder:
            return _execute(config, declare, workers, run_folder, policy)


def _execute(config, declare, workers, run_folder, policy) -> RunResult:
    start = time.perf_counter()
    timings = Timings()
    keras.utils.set_random_seed(config.seed)
    with timings.stage("build"):
        task, image_size, task_settings, check_data = declare(config)
        with workers.strategy.scope():
            backbone = build_backbone(config, image_size)
        check_cut_layer(config, backbone)
        if workers.count > 1 and (getattr(config, "cut", None) or getattr(
                config, "prune", None) or getattr(config, "prune_filters", None)):
            # Each machine would adapt the head's standardisation and recalibrate
            # batch normalisation on its own share of the images.
            raise SettingError("--cut, --prune and --prune-filters run on one "
                               "machine: leave them out of a multi-worker run.")
        cut, narrowed = getattr(config, "cut", None), None
        if getattr(config, "prune_filters", None) and cut in (None, "auto"):
            # A graph filter pruning refuses is refused before the scan (and
            # probe); without a cut, this is the narrowing itself.
            with workers.strategy.scope():
                narrower, narrowed = narrow_backbone(config, backbone,
                                                     measure=cut is None)
            if cut is None:
                unnarrowed, backbone = backbone, narrower
    with timings.stage("scan"):
        folder, report = scan(config)
    check_data(folder, report)
    full = backbone
    with timings.stage("probe"):
        backbone, probe = cut_backbone(config, backbone, folder, run_folder)
    if cut is not None:  # Narrowed once cut, the network trained.
        with timings.stage("build"), workers.strategy.scope():
            unnarrowed = backbone
            backbone, narrowed = narrow_backbone(config, backbone)
    if narrowed is not None:
        with timings.stage("refit"):
            narrowed["refit"] = refit_narrowed(config, unnarrowed, backbone, folder,
                                               image_size)
    everything = FolderExamples(folder, image_size, config.batch_size, config.seed,
                                memory_budget=0)
    settings = {**config.resume_settings(), "data": everything.fingerprint(),
                **task_settings}
    if probe is not None:
        settings["cut_layer"] = probe["cut"]
    state = run_folder.resume_state(settings, workers, policy)
    with timings.stage("build"), workers.strategy.scope():
        # A cut backbone's middle features: standardised in the head
        # (`build_head`), adapted to the cached training features.
        standardize = backbone is not full and not schedule_of(config).augment
        model = build_classifier(backbone, len(folder.class_names), config.dropout,
                                 standardize=standardize)
    weights = config.weights if config.weights is not None else "none (random)"
    cut = f" cut after {probe['cut']}" if probe else ""
    say(config, f"Backbone {config.network}{cut} ({backbone.count_params():,} parameters), "
                f"weights: {weights}, image size {image_size}")
    run_folder.prepare(state, report)
    if probe is not None and workers.is_chief:
        run_folder.write_json(PROBE_FILE, probe)
    if state is not None:
        where = run_folder.checkpoint.path if workers.is_chief else "the chief's checkpoint"
        say(config, f"Resuming from epoch {state['epoch']} ({where})")
    schedule = schedule_of(config)
    # Outside the strategy's scope: the random layers' seed state lives in the
    # tf.data pipeline, not among the replicated variables.
    augment = augmentation_layers(config.seed) if schedule.augment else None
    examples = FolderExamples(
        workers.shard(folder), image_size, config.batch_size, config.seed,
        totals=everything.totals, augment=augment,
        # Keras' fit under MirroredStrategy peeks at a batch through an iterator
        # of its own, which would decode a whole split into memory and drop it.
        memory_budget=0 if workers.name == "mirrored" else DECODED_CACHE_BYTES)
    class_weight = None
    if getattr(config, "class_weight", None) == "auto":
        class_weight = balanced_class_weights(everything.labels("train"),
                                              len(folder.class_names))
    engine = Engine(model, examples, schedule, task, workers, run_folder, state,
                    class_weight=class_weight, timings=timings)
    history = engine.run()
    if not workers.is_chief:
        summary = _worker_summary(config, workers, history, start, state, model)
        run_folder.remove()
        return RunResult(model, history, {**summary, **task.summary(engine)},
                         run_folder.root)
    if workers.strategy is not tf.distribute.get_strategy():
        copy = build_backbone(config, image_size, weights=None)
        if probe is not None:
            copy = truncate(copy, probe["cut"])
        # The same widths whichever filters random weights would keep.
        copy, _ = narrow_backbone(config, copy, measure=False)
        model = plain_copy(model, copy, config.dropout)
    with timings.stage("evaluate"):
        metrics, interpretation = _evaluate(model, engine, everything, history)
    engine.close()
    with timings.stage("export"):
        saved_model = run_folder.write_model(model, folder.class_names,
                                             config.serving_max_pixels)
    with timings.stage("tflite"):
        tflite = _write_tflite(config, model, folder, run_folder)
    with timings.stage("pruning"):
        pruning = _pruning_summary(engine, model, saved_model, tflite)
    summary = {
        **metrics,
        "seconds": round(time.perf_counter() - start, 2),
        **_data_summary(folder, report),
        "run_dir": run_folder.path,
        "saved_model": saved_model,
        "serving_max_pixels": config.serving_max_pixels,
        "model": run_folder.file("model.keras"),
        **_settings_summary(config, image_size, schedule),
        "cut": cut_summary(probe),
        "filter_pruning": narrowed,
        "pruning": pruning,
        **_engine_summary(engine, workers, model, state, schedule),
        **_rates_summary(engine),
        "class_weight": class_weight,
        "class_imbalance": class_imbalance(report),
        **task.summary(engine),
        "tflite": tflite,
        "settings": config.resume_settings(),
        "validation": interpretation.summary(),
        "history": history.history,
    }
    started = time.perf_counter()
    try:
        summary["report"] = _write_report(config, run_folder, summary,
                                          interpretation, history, report,
                                          len(history.epoch) - 1)
    except Exception as error:  # The model is trained and exported: finish.
        warnings.warn(f"The report could not be written ({type(error).__name__}: "
                      f"{error}); the run is complete. Rebuild it with "
                      f"`tftransfer report {run_folder.path}`.", stacklevel=2)
        summary["report"] = None
    summary["report_seconds"] = round(time.perf_counter() - started, 2)
    timings.add("report", time.perf_counter() - started)
    summary["timings"] = timings.summary()
    run_folder.finish(summary)
    engine.compile_for_use(model)
    return RunResult(model, history, summary, run_folder.path)


def narrow_backbone(config, backbone: keras.Model, measure: bool = True) -> tuple:
    """`--prune-filters F`: `(backbone narrowed by prune_filters, record)`,
    or `(backbone, None)` without it. The record holds each narrowed layer's
    filters and, with `measure`, the backbone's latency before and after."""
    fraction = getattr(config, "prune_filters", None)
    if not fraction:
        return backbone, None
    from tftransfer.filter_pruning import prune_filters
    from tftransfer.probe import measure_latency
    from tftransfer.train import default_fine_tune_layers

    layers = config.fine_tune_layers or default_fine_tune_layers(backbone)
    try:
        narrowed, removed = prune_filters(backbone, fraction, layers)
    except ValueError as error:
        raise SettingError(str(error)) from error
    record = {"fraction": fraction, "layers": layers, "removed": removed,
              "params_before": int(backbone.count_params()),
              "params_after": int(narrowed.count_params())}
    if measure:
        record.update(latency_ms_before=round(measure_latency(backbone, 20), 3),
                      latency_ms_after=round(measure_latency(narrowed, 20), 3))
        say(config, f"Filters pruned: {record['params_before']:,} to "
                    f"{record['params_after']:,} backbone parameters, "
                    f"{record['latency_ms_before']:.1f} to "
                    f"{record['latency_ms_after']:.1f} ms per image")
    return narrowed, record


def refit_narrowed(config, unnarrowed: keras.Model, narrowed: keras.Model,
                   folder: ImageFolder, image_size: int) -> Optional[list]:
    """`--prune-filters`: refits the narrowed convolutions to the unnarrowed
    backbone's outputs on up to `RECALIBRATION_EXAMPLES` training images drawn
    by the seed (`refit_pruned_filters`); its record, or `None` where the
    network allows none."""
    import numpy as np

    from tftransfer.data import make_dataset
    from tftransfer.engine import RECALIBRATION_EXAMPLES
    from tftransfer.filter_pruning import refit_pruned_filters
    from tftransfer.train import default_fine_tune_layers

    files = folder.used("train")
    chosen = np.random.default_rng(config.seed).permutation(len(files))
    paths = [files[index].path for index in sorted(chosen[:RECALIBRATION_EXAMPLES])]
    images = make_dataset(paths, np.zeros(len(paths), "int32"), image_size,
                          config.batch_size).map(lambda pixels, _: pixels)
    layers = config.fine_tune_layers or default_fine_tune_layers(unnarrowed)
    record = refit_pruned_filters(unnarrowed, narrowed, config.prune_filters, layers,
                                  images, seed=config.seed)
    if record:
        say(config, "Narrowed convolutions refitted to the full network's outputs "
                    f"on {len(paths)} training images: relative error "
                    + ", ".join(f"{row['layer']} {row['relative_error_before']:.2f} "
                                f"to {row['relative_error_after']:.2f}"
                                for row in record))
    return record


def _pruning_summary(engine: Engine, model, saved_model: str,
                     tflite: Optional[dict]) -> Optional[dict]:
    """`--prune`: the sparsity reached per kernel and in total, and the
    gzip-compressed sizes that the zeros shrink: the pruned kernels' (against
    the same kernels before fine-tuning, dense), the SavedModel's and a
    `.tflite`'s (the run's, or a float32 one written aside to be measured)."""
    kernels = getattr(engine, "pruned_kernels", None)
    if not kernels:
        return None
    import gzip
    import tempfile

    import numpy as np

    from tftransfer.pruning import gzip_size, sparsity_report
    from tftransfer.tflite import export_tflite

    report = sparsity_report(kernels)
    pruned = b"".join(np.asarray(kernel).tobytes() for kernel in kernels)
    with tempfile.TemporaryDirectory() as folder:
        path = (tflite or {}).get("path")
        try:
            if not path or not os.path.exists(path):
                path = export_tflite(model, os.path.join(folder, "model.tflite"))
            tflite_bytes = gzip_size(path)
        except Exception as error:  # The model is trained and exported: finish.
            tflite_bytes = f"not measured: {type(error).__name__}: {error}"
    return {
        **report,
        "sparsity_asked": engine.schedule.prune,
        "pruned_kernels_bytes": len(pruned),
        "pruned_kernels_gzip_bytes": len(gzip.compress(pruned, 9)),
        "dense_kernels_gzip_bytes": engine.dense_kernels_gzip_bytes,
        "saved_model_gzip_bytes": gzip_size(saved_model),
        "tflite_gzip_bytes": tflite_bytes,
        "reconstruction": engine.reconstruction,
    }


def _write_tflite(config: RunConfig, model, folder: ImageFolder,
                  run_folder: RunFolder) -> Optional[dict]:
    """`--tflite`: `model.tflite` and its parity report, if it keeps accuracy.

    A file that loses too much is not written; the run still finishes, and its
    summary says why (`tftransfer export-tflite` can try another quantization).
    """
    if config.tflite is None:
        return None
    from tftransfer.tflite_check import AccuracyDropError, tflite_for_folder

    say(config, f"Writing model.tflite ({config.tflite}) and checking it on the "
                "validation split ...")
    try:
        return tflite_for_folder(model, run_folder.file("model.tflite"), folder,
                                 folder.class_names, config.tflite, "validation",
                                 seed=config.seed, overwrite=True)
    except AccuracyDropError as error:
        say(config, f"model.tflite not written: {error}")
        return {**error.report, "error": str(error)}


def scan(config: RunConfig) -> tuple:
    """Scans `config.data_dir`; returns `(ImageFolder, data report)`."""
    say(config, f"Checking images in {config.data_dir} ...")
    folder = scan_image_folder(config.data_dir, config.validation_split, config.seed,
                               progress=config.verbose != 0)
    report = data_report(folder)
    say(config, summarize_data(report))
    for note in folder.notes:
        say(config, note)
    return folder, report


def _evaluate(model, engine, everything: FolderExamples, history) -> tuple:
    """The validation metrics, and the validation images' `Interpretation`.

    Returns:
        `(metrics, interpretation)`. The predictions come from what the last
        phase trained on when it can (the head on its features, the
        fine-tuned top on the float32 activations: no backbone pass);
        otherwise the full model, as exported, runs on the images. After
        fine-tuning, the loss and accuracy of these predictions are reported.
    """
    metrics = {"val_accuracy": history.history["val_accuracy"][-1],
               "val_loss": history.history["val_loss"][-1]}
    names, files = everything.folder.class_names, everything.folder.used("validation")
    paths = [f.path for f in files]
    # Across machines the chief computed its share of the features only.
    source = engine.final_predictions() if engine.workers.count == 1 else None
    network, batches = source or (model, everything.images("validation"))
    interpretation = Interpretation.from_model(network, batches, names, paths)
    if engine.schedule.fine_tune_epochs:
        scores = interpretation.metrics()
        metrics.update(val_accuracy=scores["accuracy"], val_loss=scores["loss"])
    if everything.folder.used("test"):
        scorer, batches = model, everything.images("test")
        if engine.schedule.fine_tune_epochs == 0 and engine.workers.count == 1:
            # The backbone never changed: its features of the test images
            # come through the cache, as the other splits' did.
            features = engine.frozen_features("test", stage="test")
            labels = everything.labels("test")
            scorer, batches = engine.head, [(features[i:i + 256], labels[i:i + 256])
                                            for i in range(0, len(labels), 256)]
        loss, accuracy = evaluate_classifier(scorer, batches)
        metrics.update({"test_accuracy": accuracy, "test_loss": loss})
    return metrics, interpretation


def _write_report(config, run_folder: RunFolder, summary: dict, interpretation,
                  history, report: dict, step: int) -> Optional[str]:
    """`predictions.csv`, `report/` and the TensorBoard summary of a run.

    A report that cannot be drawn warns; the run still finishes.
    """
    interpretation.write(run_folder.file(PREDICTIONS_FILE))
    if not config.report:
        return None
    from tftransfer.report import write_report

    say(config, "Writing the report ...")
    path = write_report(run_folder.file(REPORT_FOLDER), interpretation,
                        history.history, summary, report,
                        title=f"{os.path.basename(run_folder.path)}: {config.network}")
    write_run_summary(run_folder.file(LOGS_FOLDER), summary["settings"],
                      {k: summary[k] for k in ("val_accuracy", "val_loss")}, step,
                      run_folder.file(os.path.join(REPORT_FOLDER,
                                                   "confusion_matrix.png")))
    return path


def _data_summary(folder: ImageFolder, report: dict) -> dict:
    counts = report["counts"]
    return {
        "num_classes": len(folder.class_names),
        "class_names": folder.class_names,
        "num_train": sum(counts.get("train", {}).values()),
        "num_validation": sum(counts.get("validation", {}).values()),
        "num_skipped": len(folder.skipped()),
    }


def _settings_summary(config: RunConfig, image_size: int, schedule: Schedule) -> dict:
    return {
        "backbone": config.network,
        "alpha": config.alpha,
        "weights": str(config.weights) if config.weights is not None else None,
        "image_size": image_size,
        "epochs": config.epochs,
        "fine_tune_epochs": config.fine_tune_epochs,
        "augment": schedule.augment,
        "dtype_policy": keras.config.dtype_policy().name,
    }


def _rates_summary(engine: Engine) -> dict:
    """The rates each phase trained at, and the finder's results if it ran."""
    rates = {"learning_rate": engine.rate("head")}
    if engine.schedule.fine_tune_epochs:
        rates["fine_tune_learning_rate"] = engine.rate("fine_tune")
    return {**rates, "lr_decay": engine.schedule.lr_decay,
            "fine_tune_warmup": engine.schedule.fine_tune_warmup,
            "fine_tune_ema": engine.averaged.get("fine_tune", 0.0),
            "learning_rate_finder": engine.found or None}


def _engine_summary(engine: Engine, workers: Workers, model, state, schedule) -> dict:
    return {
        "strategy": workers.name,
        "num_replicas_in_sync": workers.num_replicas_in_sync,
        "num_workers": workers.count,
        "is_chief": workers.is_chief,
        # Across machines, the other workers' summaries say the same.
        "weights_sha256": weights_fingerprint(model) if workers.count > 1 else None,
        "xla": engine.xla,
        "resumed_from_epoch": state["epoch"] if state else None,
        "feature_cache": engine.cache_dir,
        "features": engine.stats.get("forward") or None,
        "test_features": engine.stats.get("test") or None,
        "fine_tune_activations": (engine.stats.get("activations")
                                  if engine.from_activations else None),
    }


def _worker_summary(config, workers, history, start, state, model) -> dict:
    """What a worker other than the chief reports (it writes no run folder)."""
    return {
        "val_accuracy": history.history["val_accuracy"][-1],
        "val_loss": history.history["val_loss"][-1],
        "seconds": round(time.perf_counter() - start, 2),
        "resumed_from_epoch": state["epoch"] if state else None,
        "is_chief": False,
        "worker": workers.index,
        "run_dir": os.path.abspath(config.output),
        "saved_model": None,
        "strategy": workers.name,
        "num_replicas_in_sync": workers.num_replicas_in_sync,
        "num_workers": workers.count,
        # The chief's says the same when all workers trained the same model.
        "weights_sha256": weights_fingerprint(model),
        "history": history.history,
    }


def run_in_folder(model, examples, schedule: Schedule, output: str, overwrite: bool,
                  callbacks, class_weight, class_names) -> tuple:
    """`fine_tune(..., output=)`: the engine with a run folder, as the CLI's.

    Returns:
        `(History, Engine)`.
    """
    workers = Workers.of(tf.distribute.get_strategy())
    with RunFolder(output, overwrite) as run_folder:
        backbone = model.get_layer("backbone")
        settings = {
            **{k: v for k, v in dataclasses.asdict(schedule).items()
               if k not in ("jit", "cache_dir", "verbose")},
            "class_weight": class_weight,
            "data": examples.fingerprint(),
            "backbone": [*network_identity(backbone), weights_fingerprint(backbone)],
            "outputs": int(model.output_shape[-1]),
        }
        state = run_folder.resume_state(settings, workers,
                                        keras.config.dtype_policy().name)
        run_folder.prepare(state, None)
        if state is not None and schedule.verbose != 0:
            print(f"Resuming from epoch {state['epoch']} ({run_folder.checkpoint.path})",
                  flush=True)
        engine = Engine(model, examples, schedule, None, workers, run_folder, state,
                        callbacks, class_weight)
        history = engine.run()
        engine.close()
        names = list(class_names or [str(i) for i in range(settings["outputs"])])
        saved_model = run_folder.write_model(model, names)
        run_folder.finish({
            "val_accuracy": history.history["val_accuracy"][-1],
            "val_loss": history.history["val_loss"][-1],
            "class_names": names,
            "run_dir": run_folder.path,
            "saved_model": saved_model,
            "serving_max_pixels": MAX_SERVING_PIXELS,
            "model": run_folder.file("model.keras"),
            **_engine_summary(engine, workers, model, state, schedule),
            "history": history.history,
        })
        return history, engine


def train_run(config: TrainConfig) -> RunResult:
    """Trains a classifier on an image folder and writes a complete run folder.

    The head is trained on backbone features computed once per image and kept in
    a cache on disk (`config.cache_dir`), so a second run on the same images and
    backbone skips the backbone altogether. The fine-tuning phase, if any, trains
    the top of the backbone from cached activations of the frozen bottom. With
    `augment=True` nothing is cached: every epoch sees new random views.

    A checkpoint is written after every epoch. When `config.output` holds an
    unfinished run with the same settings and data, it resumes from its last
    finished epoch; with other settings it is refused unless `overwrite`.
    Across machines (`strategy="multi_worker"`), each worker computes the
    features of its share of the images and trains on them in step with the
    others; the chief writes the run folder.

    Args:
        config: A `TrainConfig`.

    Returns:
        A `RunResult`: `.model` (compiled), `.history` (a `History` over both
        phases), `.summary` (what `metrics.json` holds: `val_accuracy`,
        `seconds`, `class_names`, `saved_model` and more) and `.path`.

    Raises:
        DataError: the data folder is unusable (see `scan_image_folder`).
        RunFolderError: `config.output` holds a finished run, or an unfinished
            one with other settings, and `overwrite` is False; or another
            process is writing it.

    Example:

    >>> import tempfile
    >>> from tftransfer.demo import write_demo_images
    >>> data = write_demo_images(tempfile.mkdtemp(), images_per_class=8,
    ...                          image_size=32)
    >>> result = train_run(TrainConfig(
    ...     data, output=tempfile.mkdtemp() + "/run", backbone="vgg16",
    ...     weights=None, image_size=32, epochs=2, verbose=0))
    >>> result.history.history["phase"]
    ['head', 'head']
    >>> sorted(os.listdir(result.path))[:5]
    ['data_report.json', 'history.csv', 'labels.txt', 'logs', 'metrics.json']
    >>> "report.html" in os.listdir(os.path.join(result.path, "report"))
    True
    >>> import numpy as np
    >>> loss, accuracy = result.model.evaluate(
    ...     np.zeros((2, 32, 32, 3)), np.array([0, 1]), verbose=0)
    """
    return execute(config, _declare_train)


def _declare_train(config: TrainConfig) -> Declaration:
    def check_data(folder: ImageFolder, report: dict) -> None:
        imbalance = class_imbalance(report)
        if imbalance > IMBALANCE_WARNING:
            advice = ("" if config.class_weight == "auto"
                      else "; consider --class-weight auto (class_weight='auto')")
            say(config, f"warning: the training classes are imbalanced "
                        f"{imbalance:.1f}:1 (largest to smallest){advice}")

    return Declaration(ClassifierTask(), config.image_size, {}, check_data)

"""The `tftransfer` command line: argparse in front of the library, no logic of its own."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import traceback

from tftransfer.errors import SettingError, TransferError
from tftransfer.files import DISK_ERRNOS


def _add_json(parser):
    parser.add_argument(
        "--json",
        action="store_true",
        help="end stdout with one JSON object holding the results",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `tftransfer` parser: `train` and `distill` options come from the
    config classes' fields (see `tftransfer.settings`)."""
    parser = argparse.ArgumentParser(
        prog="tftransfer",
        description="Transfer learning on a folder of images: train, evaluate, "
        "predict, and export a SavedModel that serves raw image bytes.",
    )
    from tftransfer import __version__

    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--verbose", action="store_true",
        help="show TensorFlow's C++ start-up logs (hidden unless "
        "TF_CPP_MIN_LOG_LEVEL is set)")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(commands)
    _add_model_commands(commands)
    demo = commands.add_parser(
        "demo", help="train, export and serve on generated images (no network)"
    )
    demo.add_argument(
        "--output",
        default="tftransfer-demo",
        metavar="DIR",
        help="folder for the demo's data and run (default: ./tftransfer-demo)",
    )
    _add_json(demo)
    commands.add_parser("backbones", help="list the registered backbones")
    return parser


def _add_run_commands(commands) -> None:
    from tftransfer.settings import DistillConfig, TrainConfig, add_arguments

    train = commands.add_parser(
        "train",
        help="train a classifier on an image folder",
        description="Train a classifier on DATA_DIR (one folder per class, or "
        "train/ and val/ folders holding them) and write a run folder.",
    )
    add_arguments(train, TrainConfig)
    _add_json(train)
    distill = commands.add_parser(
        "distill",
        help="distil a trained teacher into a smaller student",
        description="Train a student classifier on DATA_DIR to match a teacher's "
        "softened outputs and the labels; write a run folder like `train`.",
    )
    add_arguments(distill, DistillConfig)
    _add_json(distill)
    lr_find = commands.add_parser(
        "lr-find",
        help="suggest a learning rate (the range test, on cached features)",
        description="Run the learning-rate range test on DATA_DIR with train's "
        "options: an exponential ramp of the rate, one step per batch, stopped "
        "when the loss diverges. For the head, the suggested rate is the valley "
        "of the loss curve (fastai's), on cached backbone features; fine-tune "
        "first trains the head for --epochs, then runs on cached activations up "
        "to 0.1 and suggests a tenth of the rate where the loss diverged, at "
        "most a tenth of the head's rate. "
        "No run folder is written.")
    add_arguments(lr_find, TrainConfig)
    lr_find.add_argument("--phase", choices=("head", "fine-tune"), default="head",
                         help="the phase to find a rate for (default: head)")
    lr_find.add_argument("--plot", metavar="FILE", default=None,
                         help="PNG of the loss against the rate (default: "
                         "lr_find-PHASE.png)")
    _add_json(lr_find)
    probe = commands.add_parser(
        "probe",
        help="find how deep the backbone needs to be: a linear head at each block",
        description="Run the backbone once over DATA_DIR's training and "
        "validation images with an output at each block (where its graph can be "
        "cut at one tensor), train a linear head on each block's pooled "
        "features, and print the layers, parameters, multiply-adds and latency "
        "kept at each cut with its validation accuracy and its accuracy "
        "cross-validated over the training and validation images (what --cut "
        "auto chooses by). The features go through "
        "the cache, so `train --cut LAYER` or `--cut auto` after it computes "
        "none. It takes train's options; those that shape training or a run "
        "folder (--epochs, --prune, --output, ...) have no effect, and no run "
        "folder is written.")
    add_arguments(probe, TrainConfig)
    probe.add_argument("--table", metavar="FILE", default=None,
                       help="also write the table as CSV to FILE")
    _add_json(probe)


def _add_model_commands(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate an exported model on an image folder",
        description="Evaluate MODEL (a run folder, SavedModel or .tflite file) on "
        "DATA_DIR's "
        "test/ split, else its val/ split, else all its class folders.",
    )
    evaluate.add_argument("model", metavar="MODEL")
    evaluate.add_argument("data_dir", metavar="DATA_DIR")
    evaluate.add_argument(
        "--report", metavar="DIR",
        help="also write DIR/report.html: confusion matrix, per-class scores, "
        "top losses and the data report")
    _add_json(evaluate)
    report = commands.add_parser(
        "report", help="rebuild a run folder's HTML report",
        description="Rebuild RUN_DIR/report/report.html (learning curves, "
        "confusion matrix, per-class scores, top losses, data report) from the "
        "run folder alone.")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--output", metavar="DIR",
                        help="write the report here (default: RUN_DIR/report)")
    _add_json(report)
    predict = commands.add_parser(
        "predict", help="classify image files with an exported model"
    )
    predict.add_argument("model", metavar="MODEL")
    predict.add_argument(
        "paths", metavar="PATH", nargs="+", help="image files or folders"
    )
    predict.add_argument("--top-k", type=int, default=1, metavar="K")
    _add_json(predict)
    _add_export_tflite(commands)
    export_backbone = commands.add_parser(
        "export-backbone",
        help="write a trained model's backbone as a TF-Hub-format SavedModel",
        description="Write the backbone of MODEL (a run folder or .keras file) as "
        "a TF2 reusable SavedModel, to reuse as --backbone hub:OUTPUT.",
    )
    export_backbone.add_argument("model", metavar="MODEL")
    export_backbone.add_argument("output", metavar="OUTPUT")
    export_backbone.add_argument("--overwrite", action="store_true")
    export_backbone.add_argument(
        "--unsafe-deserialization",
        action="store_true",
        help="load a .keras file whose backbone is a TF-Hub module: that runs an "
        "external SavedModel's graph, so only for files you trust",
    )
    _add_json(export_backbone)
    _add_combine_commands(commands)


def _add_combine_commands(commands) -> None:
    from tftransfer.settings import MAX_SERVING_PIXELS

    ensemble = commands.add_parser(
        "ensemble", help="one run folder whose model averages several runs",
        description="Write a run folder whose model.keras and SavedModel average "
        "the probabilities of RUNs trained on the same classes (any backbones); "
        "metrics.json holds each member's validation accuracy and the ensemble's.")
    ensemble.add_argument("runs", metavar="RUN", nargs="+")
    ensemble.add_argument("--output", "-o", required=True, metavar="OUT")
    ensemble.add_argument(
        "--weights", default="uniform", choices=("uniform", "fit"),
        help="uniform, or fit: non-negative weights fitted on the validation "
        "split by log loss (default: uniform)")
    soup = commands.add_parser(
        "soup", help="one network: the weight average of fine-tuned runs",
        description="Write a run folder whose network averages the weights of "
        "RUNs fine-tuned from the same backbone and starting weights (a model "
        "soup): one network's serving cost.")
    soup.add_argument("runs", metavar="RUN", nargs="+")
    soup.add_argument("--output", "-o", required=True, metavar="OUT")
    soup.add_argument(
        "--greedy", action="store_true",
        help="add runs best first, each only if the validation accuracy does not "
        "fall (the runs' data folder is read)")
    for command in (ensemble, soup):
        command.add_argument(
            "--serving-max-pixels", type=int, default=MAX_SERVING_PIXELS, metavar="N",
            help="the SavedModel refuses images declaring more pixels "
            f"(default: {MAX_SERVING_PIXELS})")
        command.add_argument("--overwrite", action="store_true",
                             help="replace a finished run in OUT")
        _add_json(command)


def _add_export_tflite(commands) -> None:
    from tftransfer.settings import (
        CALIBRATION_IMAGES,
        MAX_ACCURACY_DROP,
        QUANTIZATIONS,
    )

    command = commands.add_parser(
        "export-tflite",
        help="write a checked LiteRT (TFLite) file for phones and edge devices",
        description="Write MODEL (a run folder, or a .keras file with --data) as a "
        "LiteRT file taking pixels 0..255 at the model's size (uint8 for int8, "
        "float32 otherwise) and returning probabilities, with labels.txt and a "
        "parity report (OUTPUT's name .parity.json) beside it. The file is run "
        "in LiteRT's interpreter on the run's validation split (or --data's test "
        "split, else its validation split) and is not written if it loses more "
        "accuracy than --max-accuracy-drop.")
    command.add_argument("model", metavar="MODEL")
    command.add_argument("output", metavar="OUTPUT.tflite")
    command.add_argument(
        "--quantize", default="none", choices=QUANTIZATIONS,
        help="none: float32; float16: float16 weights; dynamic: int8 weights; "
        "int8: int8 weights and activations, calibrated on training images "
        "(default: none)")
    command.add_argument(
        "--calibration-images", type=int, default=CALIBRATION_IMAGES, metavar="N",
        help=f"training images int8 calibrates on (default: {CALIBRATION_IMAGES})")
    command.add_argument(
        "--data", metavar="DATA_DIR",
        help="image folder to calibrate and check on (default: the run's)")
    command.add_argument(
        "--max-accuracy-drop", type=float, default=MAX_ACCURACY_DROP, metavar="D",
        help=f"refuse a file losing more accuracy (default: {MAX_ACCURACY_DROP})")
    command.add_argument("--overwrite", action="store_true",
                         help="replace an existing OUTPUT")
    command.add_argument("--unsafe-deserialization", action="store_true",
                         help="load a .keras file whose backbone is a TF-Hub module")
    _add_json(command)


def _train(args):
    from tftransfer.run import train_run
    from tftransfer.settings import TrainConfig, from_arguments

    config = _config(from_arguments, TrainConfig, args)
    summary = train_run(config).summary
    lines = [
        f"val_accuracy {summary['val_accuracy']:.4f} after {summary['seconds']:.1f} s"
    ]
    if "test_accuracy" in summary:
        lines.append(f"test_accuracy {summary['test_accuracy']:.4f}")
    if summary["resumed_from_epoch"] is not None:
        lines.append(f"resumed from epoch {summary['resumed_from_epoch']}")
    return summary, lines + _where_lines(summary)


def _lr_find(args):
    from tftransfer.lr_find_run import find_learning_rate
    from tftransfer.settings import TrainConfig, from_arguments

    config = _config(from_arguments, TrainConfig, args)
    try:
        record = find_learning_rate(config, args.phase,
                                    args.plot or f"lr_find-{args.phase}.png")
    except ValueError as error:
        raise SettingError(str(error)) from error
    lines = [f"suggested {args.phase} learning rate: "
             f"{record['suggested_learning_rate']:.3g} (lowest loss at "
             f"{record['minimum_loss_learning_rate']:.3g}; {record['steps']} steps"
             f"{', stopped as the loss diverged' if record['stopped_early'] else ''})"]
    if record["plot"]:
        lines.append(f"plot: {record['plot']}")
    return record, lines


def _probe(args):
    from tftransfer.probe_run import probe_folder, table_lines, write_table
    from tftransfer.settings import TrainConfig, from_arguments

    config = _config(from_arguments, TrainConfig, args)
    try:
        record = probe_folder(config)
    except ValueError as error:
        raise SettingError(str(error)) from error
    record["table"] = write_table(args.table, record["cuts"]) if args.table else None
    lines = table_lines(record) + [
        f"--cut auto takes {record['cut']} (cross-validated accuracy within "
        f"{config.cut_tolerance} of the best, {record['best']})"
        + (f"; table: {record['table']}" if record["table"] else "")]
    return record, lines


def _tflite_lines(summary) -> list:
    """What `--tflite` wrote, or why it wrote nothing."""
    report = summary.get("tflite")
    if not report:
        return []
    if "error" in report:
        return [f"model.tflite not written: {report['error']}"]
    return _parity_lines(report)


def _where_lines(summary):
    """The lines of a `train` or `distill` run saying where its results are."""
    lines = []
    if summary["num_workers"] > 1:
        lines.append(f"{summary['num_workers']} workers, "
                     f"{summary['num_replicas_in_sync']} replicas in sync")
    lines.append(f"run folder: {summary['run_dir']}")
    if summary["is_chief"]:
        lines.append(f"SavedModel for serving: {summary['saved_model']}")
        if summary.get("report"):
            lines.append(f"report: {summary['report']}")
        lines += _tflite_lines(summary)
    else:
        lines.append("(the chief writes the run folder)")
    return lines


def _distill(args):
    from tftransfer.distill_run import distill_run
    from tftransfer.settings import DistillConfig, from_arguments

    summary = distill_run(_config(from_arguments, DistillConfig, args)).summary
    lines = [
        f"student val_accuracy {summary['val_accuracy']:.4f} (teacher "
        f"{summary['teacher_val_accuracy']:.4f}) after {summary['seconds']:.1f} s",
    ]
    return summary, lines + _where_lines(summary)


def _evaluate(args):
    from tftransfer.evaluate import evaluate_folder

    result = evaluate_folder(args.model, args.data_dir, report=args.report)
    lines = [
        f"accuracy {result['accuracy']:.4f} on {result['num_images']} images "
        f"({result['split']})"
    ]
    for name, scores in result["per_class"].items():
        lines.append(
            f"  {name}: precision {scores['precision']:.3f} recall "
            f"{scores['recall']:.3f} f1 {scores['f1']:.3f} "
            f"({scores['support']} images)"
        )
    lines.append(
        f"confusion matrix (rows: true, columns: predicted): "
        f"{result['confusion_matrix']}"
    )
    if result.get("report"):
        lines.append(f"report: {result['report']}")
    return result, lines


def _report(args):
    from tftransfer.report import write_run_report

    path = write_run_report(args.run_dir, args.output)
    return {"report": path}, [f"report: {path}"]


def _predict(args):
    from tftransfer.evaluate import predict_paths

    results = predict_paths(args.model, args.paths, args.top_k)
    lines = []
    for result in results:
        if "error" in result:
            lines.append(f"{result['path']}: skipped ({result['error']})")
        else:
            guesses = ", ".join(
                f"{p['class_name']} {p['probability']:.3f}"
                for p in result["predictions"]
            )
            lines.append(f"{result['path']}: {guesses}")
    return results, lines


def _export_tflite(args):
    from tftransfer.tflite_check import tflite_from_run

    if args.calibration_images < 1:
        raise SettingError("--calibration-images must be >= 1. Received: "
                           f"{args.calibration_images}")
    if not 0 <= args.max_accuracy_drop <= 1:
        raise SettingError("--max-accuracy-drop must be in [0, 1]. Received: "
                           f"{args.max_accuracy_drop}")
    report = tflite_from_run(
        args.model, args.output, args.quantize, args.calibration_images, args.data,
        args.max_accuracy_drop, args.overwrite, not args.unsafe_deserialization)
    return report, _parity_lines(report)


def _parity_lines(report: dict) -> list:
    """An accepted LiteRT file's parity report (see `check_tflite`), for people."""
    latency = report["latency_ms"]
    return [
        f"{report['quantize']}: {report['size_bytes'] / 1e6:.2f} MB, "
        f"accuracy {report['tflite_accuracy']:.4f} (Keras model "
        f"{report['keras_accuracy']:.4f}, drop {report['accuracy_drop']:+.4f}) on "
        f"{report['num_images']} images, agreement {report['agreement']:.4f}, "
        f"largest probability difference {report['max_probability_difference']:.4f}",
        f"latency per image: {latency['1_thread']:.2f} ms on 1 thread, "
        f"{latency['all_threads']:.2f} ms on {report['threads']}",
        f"ops: {', '.join(report['ops'])}",
        f"LiteRT file: {report['path']}",
    ]


def _export_backbone(args):
    from tftransfer.hub import export_backbone
    from tftransfer.run_folder import load_run_model

    model = load_run_model(args.model, safe_mode=not args.unsafe_deserialization)
    output = export_backbone(model, args.output, overwrite=args.overwrite)
    return {"backbone": output}, [f"backbone SavedModel: {output}",
                                  f"reuse it with --backbone hub:{output}"]


def _ensemble(args):
    from tftransfer.ensemble import ensemble

    summary = ensemble(args.runs, args.output, args.weights, args.overwrite,
                       args.serving_max_pixels)
    return summary, _combined_lines("ensemble", summary)


def _soup(args):
    from tftransfer.soup import soup

    summary = soup(args.runs, args.output, args.greedy, args.overwrite,
                   args.serving_max_pixels)
    return summary, _combined_lines("soup", summary)


def _combined_lines(what: str, summary: dict) -> list:
    def accuracy(value):
        return "n/a" if value is None else f"{value:.4f}"

    lines = [f"{member['run']}: val_accuracy {accuracy(member['val_accuracy'])}, "
             f"weight {member['weight']:.3f}" for member in summary["members"]]
    lines += [f"{what}: val_accuracy {accuracy(summary['val_accuracy'])}",
              f"run folder: {summary['run_dir']}",
              f"SavedModel for serving: {summary['saved_model']}"]
    return lines


def _config(from_arguments, config_class, args):
    """The config for `args`; a value it refuses is the user's error, not a bug."""
    try:
        return from_arguments(config_class, args)
    except (ValueError, TypeError) as error:
        if isinstance(error, TransferError):
            raise
        raise SettingError(str(error)) from error


def _demo(args):
    from tftransfer.demo import run_demo

    result = run_demo(args.output)
    summary = result["train"]
    lines = [
        f"Demo data: {result['data_dir']}",
        f"Weights: {summary['weights'] or 'none (random initialization)'}",
        f"Trained {summary['backbone']} to val_accuracy "
        f"{summary['val_accuracy']:.4f} in {summary['seconds']:.1f} s",
        f"Run folder: {result['run_dir']}",
        f"SavedModel: {summary['saved_model']}",
        "Predictions through the exported SavedModel:",
    ]
    for item in result["predictions"]:
        top = item["predictions"][0]
        lines.append(
            f"  {item['path']}: {top['class_name']} ({top['probability']:.3f})"
        )
    return result, lines


def _backbones(args):
    from tftransfer.backbones import backbone_names, get_backbone_spec

    specs = [get_backbone_spec(name) for name in backbone_names()]
    lines = [
        f"{s.name:20s} {s.default_image_size} px{'  (--alpha)' if s.has_alpha else ''}"
        for s in specs
    ]
    return [s.name for s in specs], lines


COMMANDS = {
    "train": _train,
    "distill": _distill,
    "lr-find": _lr_find,
    "probe": _probe,
    "evaluate": _evaluate,
    "report": _report,
    "predict": _predict,
    "export-tflite": _export_tflite,
    "export-backbone": _export_backbone,
    "ensemble": _ensemble,
    "soup": _soup,
    "demo": _demo,
    "backbones": _backbones,
}


# What a stopped command left, and how to go on.
_RUN_HINT = (" The run folder keeps every finished epoch and no partial file: run "
             "the same command to resume (add --overwrite to start over).")
_DISK_HINT = (" Nothing half-written was left, and no file you had was "
              "replaced: free some space (or fix the disk) and run it again.")
_DISK_HINTS = {command: (" The run folder keeps every finished epoch and no partial "
                         "file: free some space (or fix the disk) and run the same "
                         "command to resume.")
               for command in ("train", "distill")}
_RESUME_HINTS = {"train": _RUN_HINT, "distill": _RUN_HINT,
                 "export-tflite": " Nothing was written.",
                 "export-backbone": " Nothing was written."}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, Kubernetes, Slurm preemption), raised in
    the main thread like Ctrl-C's `KeyboardInterrupt`, so that the same
    clean-up runs: partial files removed, run folder unlocked."""

    signum = signal.SIGTERM


def _stop_on_signals():
    """Makes SIGTERM raise `Terminated` and SIGINT `KeyboardInterrupt` (even
    when started with SIGINT ignored, as background jobs are); returns the
    handlers to put back."""
    def stop(signum, frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        return {}  # Only the main thread may set handlers.
    return {signal.SIGTERM: signal.signal(signal.SIGTERM, stop),
            signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}


def _bug(command: str) -> int:
    traceback.print_exc()
    print(f"tftransfer {command}: this is a bug in tftransfer, not in your "
          "input: please report it with the traceback above.", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    """Runs the command line; returns the exit status.

    A `TransferError` (a problem with the user's input, data, files or
    environment) is one line on stderr and exit status 2; anything else is a
    bug: its traceback, a line saying so, and exit status 1.
    """
    args = build_parser().parse_args(argv)
    from tftransfer.startup import import_tensorflow
    from tftransfer.timings import IMPORTED

    # Every command needs TensorFlow; the parser above (--help, argument
    # errors) did not import it.
    import_tensorflow(args.verbose)
    import tftransfer

    tftransfer.load_all()  # Timed as imports; registers the Keras layers.
    started = time.perf_counter()
    previous = _stop_on_signals()
    try:
        result, lines = COMMANDS[args.command](args)
    except TransferError as error:
        print(f"tftransfer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interruption:
        signum = getattr(interruption, "signum", signal.SIGINT)
        print(f"tftransfer {args.command}: stopped by {signal.Signals(signum).name}."
              + _RESUME_HINTS.get(args.command, ""), file=sys.stderr)
        return 128 + signum
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            return _bug(args.command)
        print(f"tftransfer {args.command}: error: could not write "
              f"{error.filename or 'a file'}: {error.strerror}."
              + _DISK_HINTS.get(args.command, _DISK_HINT), file=sys.stderr)
        return 2
    except Exception:
        return _bug(args.command)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print("\n".join(lines), flush=True)
    if isinstance(result, dict) and isinstance(result.get("timings"), dict):
        # The process's own cost before the command ran: imports, parsing.
        result["timings"] = {"imports": round(started - IMPORTED, 2),
                             **result["timings"]}
    if getattr(args, "json", False):
        print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

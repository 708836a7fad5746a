"""The `tftransfer` command line: argparse in front of the library, no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys

from tftransfer.errors import TransferError


def _weights(value: str):
    return None if value.lower() == "none" else value


def _add_json(parser):
    parser.add_argument(
        "--json",
        action="store_true",
        help="end stdout with one JSON object holding the results",
    )


def _add_mixed_precision(parser, what):
    from tftransfer.run import PRECISIONS

    parser.add_argument(
        "--mixed-precision",
        choices=PRECISIONS,
        default="auto",
        help=f"dtype policy of {what}; auto: float16 on GPUs with Tensor Cores, "
        "off elsewhere (default: auto)",
    )


def _add_jit(parser):
    from tftransfer.train import JIT_SETTINGS

    parser.add_argument(
        "--jit",
        choices=JIT_SETTINGS,
        default="auto",
        help="compile with XLA; auto: on GPUs, and on CPUs for networks without "
        "depthwise convolutions, where it was measured to pay (default: auto)",
    )


def _add_strategy(parser):
    from tftransfer.distribute import STRATEGIES

    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="tf.distribute strategy; multi_worker trains on the machines TF_CONFIG "
        "names, --batch-size being the global batch; auto: multi_worker when "
        "TF_CONFIG names several, mirrored with several GPUs, else default "
        "(default: auto)",
    )


def build_parser() -> argparse.ArgumentParser:
    from tftransfer.backbones import backbone_names

    parser = argparse.ArgumentParser(
        prog="tftransfer",
        description="Transfer learning on a folder of images: train, evaluate, "
        "predict, and export a SavedModel that serves raw image bytes.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train a classifier on an image folder",
        description="Train a classifier on DATA_DIR (one folder per class, or "
        "train/ and val/ folders holding them) and write a run folder.",
    )
    train.add_argument("data_dir", metavar="DATA_DIR")
    train.add_argument(
        "--output",
        "-o",
        metavar="RUN_DIR",
        help="run folder (default: saved_models/<data>-<backbone>)",
    )
    train.add_argument(
        "--backbone",
        default="mobilenet_v2",
        metavar="NAME",
        help=f"one of: {', '.join(backbone_names())} (default: mobilenet_v2)",
    )
    train.add_argument(
        "--alpha", type=float, help="width multiplier of the MobileNet family"
    )
    train.add_argument(
        "--weights",
        default="imagenet",
        type=_weights,
        metavar="imagenet|none|PATH",
        help="(default: imagenet)",
    )
    train.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="image side in pixels (default: the backbone's)",
    )
    train.add_argument(
        "--epochs",
        type=int,
        default=5,
        metavar="N",
        help="epochs with the backbone frozen (default: 5)",
    )
    train.add_argument(
        "--fine-tune-epochs",
        type=int,
        default=0,
        metavar="N",
        help="epochs with the top of the backbone unfrozen (default: 0)",
    )
    train.add_argument(
        "--fine-tune-layers",
        type=int,
        metavar="N",
        help="layers to unfreeze (default: the top 30%%)",
    )
    train.add_argument("--batch-size", type=int, default=32, metavar="N")
    train.add_argument(
        "--learning-rate",
        type=float,
        default=1e-2,
        metavar="LR",
        help="head-phase learning rate (default: 1e-2)",
    )
    train.add_argument(
        "--fine-tune-learning-rate",
        type=float,
        default=1e-4,
        metavar="LR",
        help="learning rate while the top of the backbone is unfrozen "
        "(default: 1e-4)",
    )
    train.add_argument(
        "--augment",
        action="store_true",
        help="random flips, rotations and zooms while training",
    )
    train.add_argument(
        "--validation-split",
        type=float,
        default=0.2,
        metavar="F",
        help="held-out fraction without split folders (default: 0.2)",
    )
    train.add_argument("--seed", type=int, default=0, metavar="S")
    train.add_argument(
        "--class-weight",
        choices=["auto", "none"],
        default="none",
        help="auto: weigh each class's loss by the inverse of its share of the "
        "training images (default: none)",
    )
    train.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="feature cache folder (default: $TFTRANSFER_CACHE_DIR, else "
        "~/.cache/tftransfer)",
    )
    train.add_argument(
        "--no-cache",
        action="store_true",
        help="compute backbone features in memory, without the on-disk cache",
    )
    _add_mixed_precision(train, "the backbone")
    _add_jit(train)
    _add_strategy(train)
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished run in RUN_DIR, or start an unfinished one over "
        "instead of resuming it",
    )
    _add_json(train)

    distill = commands.add_parser(
        "distill",
        help="distil a trained teacher into a smaller student",
        description="Train a student classifier on DATA_DIR to match a teacher's "
        "softened outputs and the labels; write a run folder like `train`.",
    )
    distill.add_argument("data_dir", metavar="DATA_DIR")
    distill.add_argument(
        "--teacher",
        required=True,
        metavar="MODEL",
        help="a run folder, a .keras file or a tftransfer SavedModel",
    )
    distill.add_argument(
        "--output", "-o", metavar="RUN_DIR",
        help="run folder (default: saved_models/<data>-distilled-<student>)",
    )
    distill.add_argument(
        "--student", default="mobilenet_v2", metavar="NAME",
        help="student backbone (default: mobilenet_v2)",
    )
    distill.add_argument("--alpha", type=float, help="student width multiplier")
    distill.add_argument(
        "--weights", default="imagenet", type=_weights,
        metavar="imagenet|none|PATH", help="student backbone weights (default: imagenet)",
    )
    distill.add_argument(
        "--image-size", type=int, metavar="N",
        help="image side in pixels (default: the teacher's)",
    )
    distill.add_argument("--temperature", type=float, default=3.0, metavar="T",
                         help="softens both distributions (default: 3)")
    distill.add_argument(
        "--student-loss-weight", type=float, default=0.5, metavar="W",
        help="weight of the hard-label loss; 1-W goes to matching the teacher "
        "(default: 0.5)",
    )
    distill.add_argument("--epochs", type=int, default=5, metavar="N",
                         help="epochs with the student's backbone frozen (default: 5)")
    distill.add_argument("--fine-tune-epochs", type=int, default=0, metavar="N",
                         help="epochs with the top of its backbone unfrozen "
                         "(default: 0)")
    distill.add_argument("--batch-size", type=int, default=32, metavar="N")
    distill.add_argument("--learning-rate", type=float, default=1e-3, metavar="LR")
    distill.add_argument("--seed", type=int, default=0, metavar="S")
    distill.add_argument("--cache-dir", metavar="DIR", help="feature cache folder")
    distill.add_argument("--no-cache", action="store_true",
                         help="compute teacher logits and features in memory")
    _add_mixed_precision(distill, "the student's backbone")
    _add_jit(distill)
    _add_strategy(distill)
    distill.add_argument("--overwrite", action="store_true",
                         help="replace a finished run in RUN_DIR, or start an "
                         "unfinished one over instead of resuming it")
    _add_json(distill)

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate an exported model on an image folder",
        description="Evaluate MODEL (a run folder or SavedModel) on DATA_DIR's "
        "test/ split, else its val/ split, else all its class folders.",
    )
    evaluate.add_argument("model", metavar="MODEL")
    evaluate.add_argument("data_dir", metavar="DATA_DIR")
    _add_json(evaluate)

    predict = commands.add_parser(
        "predict", help="classify image files with an exported model"
    )
    predict.add_argument("model", metavar="MODEL")
    predict.add_argument(
        "paths", metavar="PATH", nargs="+", help="image files or folders"
    )
    predict.add_argument("--top-k", type=int, default=1, metavar="K")
    _add_json(predict)

    export_backbone = commands.add_parser(
        "export-backbone",
        help="write a trained model's backbone as a TF-Hub-format SavedModel",
        description="Write the backbone of MODEL (a run folder or .keras file) as "
        "a TF2 reusable SavedModel, to reuse as --backbone hub:OUTPUT.",
    )
    export_backbone.add_argument("model", metavar="MODEL")
    export_backbone.add_argument("output", metavar="OUTPUT")
    export_backbone.add_argument("--overwrite", action="store_true")
    _add_json(export_backbone)

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


def _train(args):
    from tftransfer.run import TrainConfig, train_run

    config = TrainConfig(
        data_dir=args.data_dir,
        output=args.output,
        backbone=args.backbone,
        alpha=args.alpha,
        weights=args.weights,
        image_size=args.image_size,
        epochs=args.epochs,
        fine_tune_epochs=args.fine_tune_epochs,
        fine_tune_layers=args.fine_tune_layers,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        fine_tune_learning_rate=args.fine_tune_learning_rate,
        augment=args.augment,
        validation_split=args.validation_split,
        seed=args.seed,
        class_weight=None if args.class_weight == "none" else args.class_weight,
        cache_dir=args.cache_dir,
        cache=not args.no_cache,
        mixed_precision=args.mixed_precision,
        jit=args.jit,
        strategy=args.strategy,
        overwrite=args.overwrite,
    )
    summary = train_run(config)
    lines = [
        f"val_accuracy {summary['val_accuracy']:.4f} after {summary['seconds']:.1f} s"
    ]
    if "test_accuracy" in summary:
        lines.append(f"test_accuracy {summary['test_accuracy']:.4f}")
    if summary["resumed_from_epoch"] is not None:
        lines.append(f"resumed from epoch {summary['resumed_from_epoch']}")
    return summary, lines + _where_lines(summary)


def _where_lines(summary):
    """The lines of a `train` or `distill` run saying where its results are."""
    lines = []
    if summary["num_workers"] > 1:
        lines.append(f"{summary['num_workers']} workers, "
                     f"{summary['num_replicas_in_sync']} replicas in sync")
    lines.append(f"run folder: {summary['run_dir']}")
    if summary["is_chief"]:
        lines.append(f"SavedModel for serving: {summary['saved_model']}")
    else:
        lines.append("(the chief writes the run folder)")
    return lines


def _distill(args):
    from tftransfer.distill_run import DistillConfig, distill_run

    summary = distill_run(
        DistillConfig(
            data_dir=args.data_dir,
            teacher=args.teacher,
            output=args.output,
            student=args.student,
            alpha=args.alpha,
            weights=args.weights,
            image_size=args.image_size,
            temperature=args.temperature,
            student_loss_weight=args.student_loss_weight,
            epochs=args.epochs,
            fine_tune_epochs=args.fine_tune_epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            cache_dir=args.cache_dir,
            cache=not args.no_cache,
            mixed_precision=args.mixed_precision,
            jit=args.jit,
            strategy=args.strategy,
            overwrite=args.overwrite,
        )
    )
    lines = [
        f"student val_accuracy {summary['val_accuracy']:.4f} (teacher "
        f"{summary['teacher_val_accuracy']:.4f}) after {summary['seconds']:.1f} s",
    ]
    return summary, lines + _where_lines(summary)


def _evaluate(args):
    from tftransfer.evaluate import evaluate_folder

    result = evaluate_folder(args.model, args.data_dir)
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
    return result, lines


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


def _export_backbone(args):
    import os

    import keras

    import tftransfer  # noqa: F401  (registers tftransfer's layers for loading)
    from tftransfer.hub import export_backbone

    path = args.model
    if os.path.isdir(path):
        path = os.path.join(path, "model.keras")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model at {args.model}: expected a run folder "
                                "or a .keras file.")
    model = keras.saving.load_model(path, compile=False, safe_mode=False)
    output = export_backbone(model, args.output, overwrite=args.overwrite)
    return {"backbone": output}, [f"backbone SavedModel: {output}",
                                  f"reuse it with --backbone hub:{output}"]


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
    "evaluate": _evaluate,
    "predict": _predict,
    "export-backbone": _export_backbone,
    "demo": _demo,
    "backbones": _backbones,
}


def main(argv=None) -> int:
    """Runs the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        result, lines = COMMANDS[args.command](args)
    except (TransferError, ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"tftransfer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tftransfer {args.command}: interrupted", file=sys.stderr)
        return 130
    print("\n".join(lines), flush=True)
    if getattr(args, "json", False):
        print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

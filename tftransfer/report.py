"""The HTML report of a run or an evaluation: `report.html` and its PNGs.

`write_report` draws the pictures (`tftransfer.plots`) and writes one
self-contained page beside them: no script, no style sheet and no font from
elsewhere, nothing loaded from the network, readable in any browser. Its
numbers come from an `Interpretation` of the validation (or evaluated)
images, a run's `history.csv` and its data report. `write_run_report`
rebuilds it from a run folder alone (`tftransfer report RUN`).
"""

from __future__ import annotations

import html
import json
import os
import pathlib
from typing import Optional

from tftransfer.errors import DataError
from tftransfer.files import write_atomically
from tftransfer.interpretation import Interpretation, read_predictions
from tftransfer.plots import (
    class_counts,
    confusion_matrices,
    draw,
    learning_curves,
    top_losses,
)

REPORT_FOLDER = "report"
TOP_LOSSES = 16
_SUMMARY_KEYS = (
    "backbone", "student", "teacher", "alpha", "weights", "image_size", "epochs",
    "fine_tune_epochs", "augment", "val_accuracy", "val_loss", "test_accuracy",
    "test_loss", "teacher_val_accuracy", "num_train", "num_validation",
    "num_skipped", "seconds", "accuracy", "loss", "num_images", "split", "model",
)
_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; }
"""


def write_report(folder: str, interpretation: Optional[Interpretation] = None,
                 history: Optional[dict] = None, summary: Optional[dict] = None,
                 data: Optional[dict] = None, title: str = "tftransfer report",
                 num_top_losses: int = TOP_LOSSES) -> str:
    """Writes `folder/report.html` and the PNGs it shows; returns the HTML's path.

    Every part is optional: a section is written for what is given. A plot
    that cannot be drawn is left out with a warning.

    Args:
        folder: Where to write; created if needed.
        interpretation: Predictions on labelled images (`Interpretation`):
            the confusion matrix, most-confused pairs, per-class scores and
            top losses.
        history: `History.history`-like lists with a `phase` per epoch.
        summary: A run's `metrics.json` (or `evaluate_folder`'s result): a
            table of its main settings and results.
        data: A data report (`data_report.json`): images per class and split,
            skipped files and their reasons, identical files across splits.
        title: The page's title.
        num_top_losses: Images in the top-losses grid. Defaults to `16`.

    Returns:
        The path of `report.html`.

    Example:

    >>> import tempfile
    >>> interpretation = Interpretation([[0.9, 0.1], [0.4, 0.6]], [0, 0],
    ...                                 ["cat", "dog"])
    >>> path = write_report(tempfile.mkdtemp(), interpretation,
    ...                     history={"loss": [0.9, 0.5], "phase": ["head"] * 2})
    >>> sorted(os.listdir(os.path.dirname(path)))
    ['confusion_matrix.png', 'learning_curves.png', 'report.html']
    """
    os.makedirs(folder, exist_ok=True)
    sections = [f"<h1>{_text(title)}</h1>"]
    if summary and summary.get("note"):
        sections.append(f"<p><b>{_text(summary['note'])}</b></p>")
    if summary:
        rows = [(key, summary[key]) for key in _SUMMARY_KEYS
                if summary.get(key) is not None]
        sections.append(_table(["", ""], rows, header=False))
    if history and history.get("loss"):
        sections.append(_section("Learning curves", _image(
            folder, "learning_curves.png", learning_curves, history)))
    if interpretation is not None:
        sections.append(_results(folder, interpretation, num_top_losses))
    if summary and isinstance(summary.get("tflite"), dict):
        sections.append(_tflite(summary["tflite"]))
    if summary and any(summary.get(key) for key in _COMPRESSION_KEYS):
        sections.append(_compression(summary))
    if data:
        sections.append(_data(folder, data))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_text(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(sections) + "\n</body></html>\n")
    path = os.path.join(folder, "report.html")
    write_atomically(path, lambda stream: stream.write(page), text=True)
    return path


def write_run_report(run_dir: str, output: Optional[str] = None) -> str:
    """Rebuilds a run folder's report from its files alone; returns its path.

    Reads `metrics.json`, `history.csv`, `data_report.json` and
    `predictions.csv` (the validation images' probabilities).

    Args:
        run_dir: A finished run folder.
        output: Where to write. Defaults to `RUN_DIR/report`.

    Returns:
        The path of `report.html`.

    Raises:
        DataError: `run_dir` holds no finished run, or its predictions.csv
            cannot be read.

    Example:

    >>> import tempfile
    >>> try:
    ...     write_run_report(tempfile.mkdtemp())
    ... except DataError as error:
    ...     print("metrics.json" in str(error))
    True
    """
    from tftransfer.run_folder import read_history

    metrics_path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(metrics_path):
        raise DataError(f"No finished run at {run_dir}: expected a run folder "
                        "holding metrics.json (written when a run ends).")
    with open(metrics_path, encoding="utf-8") as handle:
        summary = json.load(handle)
    data = None
    data_path = os.path.join(run_dir, "data_report.json")
    if os.path.isfile(data_path):
        with open(data_path, encoding="utf-8") as handle:
            data = json.load(handle)
    name = summary.get("backbone") or summary.get("student") or "run"
    try:
        interpretation = read_predictions(run_dir)
    except (ValueError, IndexError) as error:
        raise DataError(f"{run_dir}/predictions.csv cannot be read ({error}). "
                        "`tftransfer evaluate RUN_DIR DATA_DIR --report DIR` "
                        "writes a report from the model instead.") from error
    if interpretation is None:
        summary = {**summary, "note": (
            "This run kept no predictions.csv (it predates them): no confusion "
            "matrix, per-class scores or top losses. `tftransfer evaluate "
            "RUN_DIR DATA_DIR --report DIR` writes them from the model.")}
    return write_report(
        output or os.path.join(run_dir, REPORT_FOLDER), interpretation,
        read_history(os.path.join(run_dir, "history.csv")), summary, data,
        title=f"{os.path.basename(os.path.abspath(run_dir))}: {name}")


def _results(folder: str, interpretation: Interpretation, num_top_losses: int) -> str:
    metrics = interpretation.metrics()
    parts = [f"<p>accuracy <b>{metrics['accuracy']:.4f}</b>, loss "
             f"{metrics['loss']:.4f} on {metrics['num_images']} images</p>",
             _image(folder, "confusion_matrix.png", confusion_matrices,
                    metrics["confusion_matrix"], interpretation.class_names)]
    confused = interpretation.most_confused()[:20]
    if confused:
        parts.append("<h3>Most confused</h3>" + _table(
            ["true class", "predicted as", "images"], confused))
    parts.append("<h3>Per class</h3>" + _table(
        ["class", "precision", "recall", "F1", "support"],
        [(name, f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}",
          s["support"]) for name, s in metrics["per_class"].items()]))
    worst = interpretation.top_losses(num_top_losses)
    readable = [item for item in worst if item["path"] and os.path.isfile(item["path"])]
    if worst:
        grid = _image(folder, "top_losses.png", top_losses, readable) if readable else ""
        parts.append("<h3>Top losses</h3>" + grid + _table(
            ["", "image", "true", "predicted", "probability", "loss"],
            [(rank + 1, _link(item["path"]), item["true"], item["predicted"],
              f"{item['probability']:.3f}", f"{item['loss']:.3f}")
             for rank, item in enumerate(worst)], raw_columns=(1,)))
    return _section("Validation results", "\n".join(parts))


def _tflite(report: dict) -> str:
    if "error" in report:
        return _section("LiteRT file", f"<p>not written: {_text(report['error'])}</p>")
    keys = ("quantize", "size_bytes", "keras_accuracy", "tflite_accuracy",
            "accuracy_drop", "agreement", "max_probability_difference")
    return _section("LiteRT file", _table(
        ["", ""], [(key, report[key]) for key in keys if key in report], header=False))


_COMPRESSION_KEYS = ("cut", "pruning", "filter_pruning")


def _compression(summary: dict) -> str:
    """The cut, the magnitude pruning and the filter pruning of a run."""
    parts = []
    cut = summary.get("cut")
    if cut:
        rows = [("cut after", cut["layer"])]
        if cut.get("best"):
            rows += [("best probed cut", cut["best"]), ("tolerance", cut["tolerance"])]
        for key in ("layers", "params", "madds", "latency_ms", "val_accuracy"):
            if (cut.get("probe") or {}).get(key) is not None:
                rows.append((f"probe: {key}", cut["probe"][key]))
        parts.append(_table(["", ""], rows, header=False))
    pruning = summary.get("pruning")
    if pruning:
        parts.append("<h3>Magnitude pruning</h3>")
        parts.append(_table(["", ""], [
            ("sparsity asked", pruning["sparsity_asked"]),
            ("sparsity reached", pruning["total"]["sparsity"]),
            ("pruned kernels, gzip bytes", pruning["pruned_kernels_gzip_bytes"]),
            ("the same kernels dense, gzip bytes", pruning["dense_kernels_gzip_bytes"]),
            ("SavedModel, gzip bytes", pruning["saved_model_gzip_bytes"]),
            (".tflite, gzip bytes", pruning["tflite_gzip_bytes"])], header=False))
        parts.append(_table(["layer", "weights", "sparsity"], [
            (row["layer"], row["weights"], row["sparsity"])
            for row in pruning["layers"]]))
    narrowed = summary.get("filter_pruning")
    if narrowed:
        parts.append("<h3>Filter pruning</h3>")
        parts.append(_table(["", ""], [
            (key, narrowed[key]) for key in ("fraction", "params_before", "params_after",
                                             "latency_ms_before", "latency_ms_after")
            if narrowed.get(key) is not None], header=False))
        parts.append(_table(["layer", "filters before", "filters after"], [
            (row["layer"], row["filters_before"], row["filters_after"])
            for row in narrowed["removed"]]))
    return _section("Cut and pruned", "\n".join(parts))


def _data(folder: str, data: dict) -> str:
    counts = data.get("counts", {})
    splits = [split for split in counts if counts[split]]
    names = data.get("class_names") or sorted(
        {name for split in splits for name in counts[split]})
    parts = [_table(["class", *splits], [
        (name, *(counts[split].get(name, 0) for split in splits)) for name in names])]
    if splits:
        parts.append(_image(folder, "class_counts.png", class_counts, counts))
    skipped = [f for f in data.get("files", []) if f.get("status") == "skipped"]
    parts.append(f"<h3>Skipped files ({len(skipped)})</h3>")
    if skipped:
        parts.append(_table(["file", "reason"],
                            [(f["path"], f["reason"]) for f in skipped]))
    duplicates = data.get("duplicates_across_splits", [])
    parts.append(f"<h3>Identical files in more than one split ({len(duplicates)})</h3>")
    if duplicates:
        parts.append(_table(["files"], [(", ".join(group),) for group in duplicates]))
    where = f"<p>{_text(data['data_dir'])}</p>" if data.get("data_dir") else ""
    return _section("Data", where + "\n".join(parts))


def _image(folder: str, name: str, plot, *args) -> str:
    """Draws `name` into `folder`; an `<img>` for it, or a note if it failed."""
    if draw(plot, os.path.join(folder, name), *args) is None:
        return f"<p>({_text(name)} could not be drawn)</p>"
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(name)}"></p>'


def _section(heading: str, body: str) -> str:
    return f"<section><h2>{_text(heading)}</h2>\n{body}\n</section>"


def _table(headings, rows, header: bool = True, raw_columns=()) -> str:
    head = ("<tr>" + "".join(f"<th>{_text(h)}</th>" for h in headings) + "</tr>"
            if header else "")
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cell = value if i in raw_columns else _text(value)
            cells.append(f"<td class=\"n\">{cell}</td>" if numeric else f"<td>{cell}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + head + "".join(body) + "</table>"


def _link(path: Optional[str]) -> str:
    if not path:
        return ""
    if not os.path.isabs(path) or not os.path.isfile(path):
        return _text(path)  # Moved or deleted since: named, not linked.
    return f'<a href="{html.escape(pathlib.Path(path).as_uri())}">{_text(path)}</a>'


def _text(value) -> str:
    if isinstance(value, float):
        value = f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return html.escape(str(value))

"""The report's pictures, drawn with matplotlib without a display.

Figures are made with `matplotlib.figure.Figure`, never `pyplot`: no global
state and no backend is touched, so a user's notebook keeps its own, and
nothing needs a display. `draw` wraps every plot: a plot that fails warns and
returns `None`, and never fails the run that asked for it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Optional

import numpy as np

from tftransfer.files import write_atomically

DPI = 100


def draw(plot: Callable, path: str, *args, **kwargs) -> Optional[str]:
    """Runs `plot(*args, **kwargs)` for a `Figure` and writes it to `path` as PNG.

    Returns:
        `path`, or `None` (with a warning) if the plot could not be drawn or
        written. A PNG already at `path` is replaced only by a whole new one.
    """
    try:
        with warnings.catch_warnings():  # Layout advice from matplotlib.
            warnings.simplefilter("ignore")
            figure = plot(*args, **kwargs)
            # Not bbox_inches="tight", which draws every figure twice (the
            # constrained layout already keeps it inside its canvas), and
            # zlib's fastest level: the two took 1.2 s of a run's 1.9 s
            # report, for PNGs about 1.5 times larger.
            write_atomically(path, lambda stream: figure.savefig(
                stream, format="png", dpi=DPI,
                pil_kwargs={"compress_level": 1}))
        return path
    except Exception as error:  # A picture is never worth a failed run.
        warnings.warn(f"Could not draw {path}: {type(error).__name__}: {error}",
                      stacklevel=2)
        return None


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def learning_curves(history: dict):
    """Loss and accuracy per epoch, training and validation, the phases marked.

    Args:
        history: `History.history`-like lists (`loss`, `val_loss`,
            `accuracy`, `val_accuracy`, `phase`), one entry per epoch.
    """
    from matplotlib.ticker import MaxNLocator

    figure = _figure(10, 4)
    axes = figure.subplots(1, 2)
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    phases = history.get("phase", [])
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, label in ((metric, "training"), (f"val_{metric}", "validation")):
            values = history.get(key)
            if values:
                ax.plot(epochs[:len(values)], values, marker="o", label=label)
        for epoch in range(1, len(phases)):
            if phases[epoch] != phases[epoch - 1]:
                ax.axvline(epoch + 0.5, color="gray", linestyle="--")
                ax.text(epoch + 0.6, 0.98, phases[epoch].replace("_", "-"),
                        transform=ax.get_xaxis_transform(), va="top",
                        color="gray", fontsize=8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return figure


def confusion_matrices(matrix, class_names: list):
    """The confusion matrix twice: counts, and normalised by true class."""
    matrix = np.asarray(matrix, "float64")
    n = len(class_names)
    side = min(24.0, max(4.0, 0.35 * n + 2.5))
    figure = _figure(2 * side, side)
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros_like(matrix),
                           where=totals > 0)
    for ax, values, title, fmt in zip(
            figure.subplots(1, 2), (matrix, normalised),
            ("counts", "normalised by true class"), ("{:.0f}", "{:.2f}")):
        image = ax.imshow(values, cmap="Blues", vmin=0)
        figure.colorbar(image, ax=ax, shrink=0.8)
        ticks = np.arange(n)
        labels = [_short(name) for name in class_names]
        ax.set_xticks(ticks, labels, rotation=90, fontsize=8 if n > 10 else 10)
        ax.set_yticks(ticks, labels, fontsize=8 if n > 10 else 10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        if n <= 20:
            limit = values.max() / 2 if values.size else 0
            for t in range(n):
                for p in range(n):
                    ax.text(p, t, fmt.format(values[t, p]), ha="center",
                            va="center", fontsize=8,
                            color="white" if values[t, p] > limit else "black")
    return figure


def top_losses(items: list, columns: int = 4, thumbnail: int = 160):
    """A grid of images, each titled true / predicted (probability) and loss.

    Args:
        items: `Interpretation.top_losses` entries with a readable `path`.
    """
    from PIL import Image

    rows = max(1, math.ceil(len(items) / columns))
    figure = _figure(3 * columns, 3.2 * rows)
    axes = np.asarray(figure.subplots(rows, columns)).reshape(-1)
    for ax in axes:
        ax.axis("off")
    for ax, item in zip(axes, items):
        try:
            with Image.open(item["path"]) as image:
                image = image.convert("RGB")
                image.thumbnail((thumbnail, thumbnail))
                ax.imshow(np.asarray(image))
        except Exception:  # Moved or unreadable since: the title still says.
            ax.text(0.5, 0.5, "(image not readable)", ha="center",
                    transform=ax.transAxes)
        ax.set_title(f"true {_short(item['true'])}\npredicted "
                     f"{_short(item['predicted'])} {item['probability']:.2f}\n"
                     f"loss {item['loss']:.2f}", fontsize=9)
    return figure


def class_counts(counts: dict):
    """Images per class, one bar group per split."""
    splits = [split for split, per_class in counts.items() if per_class]
    names = sorted({name for split in splits for name in counts[split]})
    figure = _figure(min(24.0, max(5.0, 0.4 * len(names) * max(1, len(splits)))), 4)
    ax = figure.subplots()
    width = 0.8 / max(1, len(splits))
    positions = np.arange(len(names))
    for i, split in enumerate(splits):
        ax.bar(positions + i * width, [counts[split].get(name, 0) for name in names],
               width, label=split)
    ax.set_xticks(positions + width * (len(splits) - 1) / 2,
                  [_short(name) for name in names], rotation=90 if len(names) > 8 else 0)
    ax.set_ylabel("images")
    ax.legend()
    return figure


def learning_rate_range(rates, losses, suggestion: Optional[float] = None):
    """The range test's smoothed loss against the learning rate (log scale)."""
    figure = _figure(6, 4)
    ax = figure.subplots()
    ax.plot(rates, losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    if suggestion:
        ax.axvline(suggestion, color="red", linestyle="--")
        ax.text(suggestion, 0.98, f" suggested {suggestion:.2g}", color="red",
                transform=ax.get_xaxis_transform(), va="top")
    ax.grid(alpha=0.3, which="both")
    return figure


def _short(name: str, limit: int = 24) -> str:
    """A class name fit for an axis: one line, at most `limit` characters."""
    name = " ".join(str(name).split())
    name = name if len(name) <= limit else name[:limit - 1] + "…"
    return name.replace("$", r"\$")  # Not matplotlib's math text.

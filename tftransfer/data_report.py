"""What was found in a data folder: the `data_report.json` of a run, and its summary."""

from __future__ import annotations

import os

from tftransfer.folders import ImageFolder


def data_report(folder: ImageFolder) -> dict:
    """What was found in the data folder, as written to `data_report.json`."""
    skipped = {}
    for f in folder.skipped():
        kind = f.reason.split(":")[0].split(" (")[0]
        skipped[kind] = skipped.get(kind, 0) + 1
    by_digest = {}
    for f in folder.files:
        if f.status == "used":
            by_digest.setdefault(f.digest, []).append(f)
    duplicates = []
    for group in by_digest.values():
        splits = {f.split for f in group}
        if len(splits) > 1:
            duplicates.append(
                sorted(os.path.relpath(f.path, folder.root) for f in group)
            )
    return {
        "data_dir": folder.root,
        "layout": folder.layout,
        "notes": list(folder.notes),
        "class_names": folder.class_names,
        "counts": folder.counts(),
        "skipped": skipped,
        "duplicates_across_splits": duplicates,
        "files": [
            {
                "path": os.path.relpath(f.path, folder.root),
                "class": f.class_name,
                "split": f.split,
                "status": f.status,
                "reason": f.reason,
            }
            for f in folder.files
        ],
    }


def summarize_data(report: dict) -> str:
    """The few lines printed after the data check: counts, skips, leaks."""
    lines = []
    for split, counts in report["counts"].items():
        per_class = ", ".join(f"{name} {count}" for name, count in counts.items())
        lines.append(f"  {split}: {sum(counts.values())} images ({per_class})")
    skipped = sum(report["skipped"].values())
    if skipped:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(report["skipped"].items()))
        lines.append(f"  skipped {skipped} file(s): {kinds}")
        for f in report["files"]:
            if f["status"] == "skipped":
                lines.append(f"    {f['path']}: {f['reason']}")
    if report["duplicates_across_splits"]:
        lines.append(
            f"  warning: {len(report['duplicates_across_splits'])} image(s) "
            "appear in more than one split (identical content)"
        )
    return "\n".join(lines)


def class_imbalance(report: dict, split: str = "train") -> float:
    """The ratio of the largest class to the smallest in `split`."""
    counts = list(report["counts"].get(split, {}).values())
    return max(counts) / min(counts) if counts and min(counts) else float("inf")

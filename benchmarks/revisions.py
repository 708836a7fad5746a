"""tftransfer at one git revision against the working tree, in one run.

For a change that must not slow anything down (a refactoring): the same
commands, run by the code of `--base` (checked out in a temporary git
worktree) and by this checkout, alternated round by round, each a whole
process (imports, scan, training, export), with the median of the rounds:

  frozen-cold   train --epochs E with an empty feature cache
  frozen-warm   the same again, the cache full
  fine-tune     train --epochs E --fine-tune-epochs F, empty cache
  distill       distill (MobileNetV2 0.35 student) from a teacher trained
                once beforehand (not timed), empty cache

Usage:
  KERAS_HOME=<copy of ../shared/weights/keras> python benchmarks/revisions.py \\
      ../shared/data/hymenoptera --base HEAD~3 --rounds 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from frozen_phase import timed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONE = ["--backbone", "mobilenet", "--alpha", "0.75", "--image-size", "224"]


def tftransfer(checkout, *args):
    """A command that runs `python -m tftransfer ARGS` on `checkout`'s code."""
    code = (f"import sys; sys.path.insert(0, {checkout!r}); "
            "from tftransfer.cli import main; sys.exit(main())")
    return [sys.executable, "-c", code, *args]


def scenarios(data, work, teacher, epochs, fine_tune_epochs):
    """`{name: (args, reuse_cache)}`; `reuse_cache` runs on the frozen-cold cache."""
    return {
        "frozen-cold": (["train", data, *BACKBONE, "--epochs", str(epochs)], False),
        "frozen-warm": (["train", data, *BACKBONE, "--epochs", str(epochs)], True),
        "fine-tune": (["train", data, *BACKBONE, "--epochs", str(epochs),
                       "--fine-tune-epochs", str(fine_tune_epochs)], False),
        "distill": (["distill", data, "--teacher", teacher, "--student",
                     "mobilenet_v2", "--alpha", "0.35", "--epochs", str(epochs)],
                    False),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument("--scenarios", nargs="+",
                        help="run only these (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        base = os.path.join(work, "base")
        subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", base,
                        args.base], check=True, capture_output=True)
        try:
            run(args, work, {"base": base, "current": REPO})
        finally:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", base],
                           check=False, capture_output=True)


def run(args, work, checkouts):
    teacher = os.path.join(work, "teacher")
    every = scenarios(args.data_dir, work, teacher, args.epochs, args.fine_tune_epochs)
    chosen = {name: every[name] for name in args.scenarios or every}
    if "distill" in chosen:
        timed(tftransfer(REPO, "train", args.data_dir, *BACKBONE, "--epochs", "5",
                         "--output", teacher, "--cache-dir", os.path.join(work, "tc"),
                         "--json"))
    results = {}
    for round_index in range(args.rounds):
        order = list(checkouts) if round_index % 2 == 0 else list(checkouts)[::-1]
        for name, (command, reuse) in chosen.items():
            for revision in order:
                cache = os.path.join(work, f"cache-{revision}-{round_index}")
                if not reuse:
                    cache += f"-{name}"
                output = os.path.join(work, f"run-{revision}-{round_index}-{name}")
                seconds, out = timed(tftransfer(
                    checkouts[revision], *command, "--output", output, "--cache-dir",
                    cache if not reuse else cache + "-frozen-cold", "--json"))
                results.setdefault((name, revision), []).append(
                    (seconds, out["val_accuracy"], out["peak_rss_mib"]))
                print(f"round {round_index + 1} {name:12s} {revision:8s} "
                      f"{seconds:7.1f} s  val {out['val_accuracy']:.4f}  "
                      f"{out['peak_rss_mib']} MiB", flush=True)
    print(f"\n{'scenario':12s} {'base s':>8s} {'current s':>10s} {'ratio':>6s} "
          f"{'base val':>9s} {'cur val':>8s} {'base MiB':>9s} {'cur MiB':>8s}")
    summary = {}
    for name in chosen:
        rows = {rev: results[(name, rev)] for rev in checkouts}
        median = {rev: [statistics.median(column) for column in zip(*rows[rev])]
                  for rev in checkouts}
        base, current = median["base"], median["current"]
        summary[name] = {"base": base, "current": current,
                         "ratio": current[0] / base[0]}
        print(f"{name:12s} {base[0]:8.1f} {current[0]:10.1f} "
              f"{current[0] / base[0]:6.2f} {base[1]:9.4f} {current[1]:8.4f} "
              f"{base[2]:9.0f} {current[2]:8.0f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Importing TensorFlow without its C++ start-up logs.

TensorFlow prints lines such as `I0000 ... cudart_stub.cc:31] Could not find
cuda drivers` and `WARNING: All log messages before absl::InitializeLog() is
called are written to STDERR` while it loads, before the
`TF_CPP_MIN_LOG_LEVEL` variable is read, so the variable alone cannot hide
them. The command line imports TensorFlow here with the process's stderr
(file descriptor 2) sent to a temporary file, then writes back every line
that is not such a log: nothing else is lost.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

# `I0000 00:00:1796254724.240541    4098 cudart_stub.cc:31] ...`, and absl's notice.
_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:. ]+\d+ [\w.]+:\d+\] |"
                       r"^WARNING: All log messages before absl::InitializeLog\(\)")


def import_tensorflow(verbose: bool = False) -> None:
    """Imports TensorFlow and Keras, hiding TensorFlow's C++ start-up logs.

    Args:
        verbose: Show them. They are also shown when the user set
            `TF_CPP_MIN_LOG_LEVEL` themselves (then that level applies).
    """
    if "tensorflow" in sys.modules:
        return
    if verbose or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401

        return
    # Later C++ logs (a failed CUDA probe on a machine without GPUs) honour it.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines(True):
                if not _LOG_LINE.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()

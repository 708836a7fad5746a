"""Writing a file so that readers see the old contents or the new, never half."""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Callable


@functools.cache
def _default_mode() -> int:
    """The mode `open` gives a new file: 0o666 less the process's umask."""
    # os.umask both sets and returns the mask; this reads it once, early.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: str, write: Callable, text: bool = False,
                     prefix: str = ".tmp-", suffix: str = "") -> None:
    """Writes `path` through a temporary file beside it, renamed into place.

    A kill or an error leaves `path` as it was (and removes the temporary file,
    unless the process was killed: its name starts with `prefix`, for a later
    sweep). The file gets the permissions a plain `open` would give it:
    `tempfile.mkstemp` alone makes files only their owner can read.

    Args:
        path: The file to write.
        write: `callable(stream)` that writes the contents.
        text: Open the stream in text mode (else binary). Defaults to `False`.
        prefix: Start of the temporary file's name. Defaults to `".tmp-"`.
        suffix: End of the temporary file's name. Defaults to `""`.
    """
    handle, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix,
                                   dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(handle, "w" if text else "wb",
                       **({"newline": ""} if text else {})) as stream:
            write(stream)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

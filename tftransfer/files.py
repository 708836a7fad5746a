"""Writing a file so that readers see the old contents or the new, never half."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable

TEMPORARY_PREFIX = ".tmp-"
# A temporary file this old is a killed writer's: no write takes an hour.
STALE_SECONDS = 3600


def _umask() -> int:
    """This process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Elsewhere os.umask is the only way to read it, and it sets it too: put it
    # back at once (a file another thread creates in between gets 0o022).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: str, write: Callable, text: bool = False,
                     prefix: str = TEMPORARY_PREFIX, suffix: str = "") -> None:
    """Writes `path` through a temporary file beside it, renamed into place.

    A kill or an error leaves `path` as it was (and removes the temporary file,
    unless the process was killed: its name starts with `prefix`, for a later
    `sweep_temporaries`). The file keeps the permissions of the one it replaces, or gets
    those a plain `open` would give it: `tempfile.mkstemp` alone makes files
    only their owner can read.

    Args:
        path: The file to write.
        write: `callable(stream)` that writes the contents.
        text: Open the stream in text mode (else binary). Defaults to `False`.
        prefix: Start of the temporary file's name. Defaults to
            `TEMPORARY_PREFIX`.
        suffix: End of the temporary file's name. Defaults to `""`.
    """
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        mode = 0o666 & ~_umask()
    handle, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix,
                                   dir=os.path.dirname(path) or ".")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(handle, "w" if text else "wb",
                       **({"newline": ""} if text else {})) as stream:
            write(stream)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def sweep_temporaries(directory: str, older_than: float = STALE_SECONDS) -> int:
    """Removes the temporary files killed writers left in `directory`'s tree.

    Only `write_atomically`'s (named `TEMPORARY_PREFIX...`) older than
    `older_than` seconds: a younger one may be another process's write in
    progress. Files that vanish or cannot be removed meanwhile are left alone.

    Returns:
        How many were removed.
    """
    removed, now = 0, time.time()
    for root, _, names in os.walk(directory):
        for name in names:
            if not name.startswith(TEMPORARY_PREFIX):
                continue
            path = os.path.join(root, name)
            try:
                if now - os.lstat(path).st_mtime > older_than:
                    os.remove(path)
                    removed += 1
            except OSError:
                pass
    return removed

"""Writing files and folders so that readers see the old contents or the new, never half.

Two entry points, one scheme (write beside the destination, then rename over it):

- `write_atomically(path, write)`: `write(stream)` fills a file (checkpoints,
  cache entries, JSON, CSV).
- `replace_atomically(path, write)`: `write(tmp_path)` writes a file or a folder
  by its path (a SavedModel, a `.keras` file, a `.tflite` file); the previous
  one is moved aside and removed only once the new one is in place, and
  `recover_interrupted` puts it back after a kill in between.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

TEMPORARY_PREFIX = ".tmp-"
# A temporary file this old is a killed writer's: no write takes an hour.
STALE_SECONDS = 3600
# A full, read-only or failing disk: the user's to fix, not a bug.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS,
                         errno.EFBIG, errno.EACCES, errno.EPERM})


def naming(error: OSError, path: str) -> OSError:
    """`error` (same class and errno) naming `path`, the file being written,
    rather than the temporary file the error happened in."""
    if error.errno is None:
        return error
    return OSError(error.errno, error.strerror, os.fspath(path))


def disk_error(error: BaseException, path: str):
    """The `OSError` of a full or failing disk in `error`, naming `path`, or
    `None`. TensorFlow's writers (a SavedModel's variables) raise its own
    `OpError`, whose message holds the system's (`No space left on device`)."""
    if isinstance(error, OSError):
        return naming(error, path)
    text = str(error)
    for code in sorted(DISK_ERRNOS):
        if os.strerror(code) in text:
            return OSError(code, os.strerror(code), os.fspath(path))
    return None


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
                       **({"newline": "", "encoding": "utf-8"} if text else {})
                       ) as stream:
            write(stream)
        os.replace(tmp, path)
    except BaseException as error:
        _failed_write(tmp, error, path)
        raise


def _failed_write(tmp: str, error: BaseException, path: str) -> None:
    """Removes the temporary file of a failed write; raises a full or failing
    disk's error naming `path` (else the caller re-raises `error`)."""
    if os.path.exists(tmp):
        os.remove(tmp)
    failed = disk_error(error, path)
    if failed is not None:
        raise failed from error


_names = itertools.count()


def write_bytes_atomically(path: str, contents: bytes) -> None:
    """`write_atomically` of bytes, for the many small files of a cache.

    The temporary file is created with the mode a plain `open` gives (the
    umask applies), so there is no umask to read, no mode to copy and no
    `chmod`: a cache entry took 0.34 ms through `write_atomically`, and a
    probe writes one per image and cut point (56,000 for flowers128). A kill
    leaves the temporary file for `sweep_temporaries`, as there.
    """
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f"{TEMPORARY_PREFIX}{os.getpid()}-"
                               f"{threading.get_ident()}-{next(_names)}")
    try:
        handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(handle, "wb") as stream:
            stream.write(contents)
        os.replace(tmp, path)
    except BaseException as error:
        _failed_write(tmp, error, path)
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


def write_json_atomically(path: str, payload) -> None:
    """Writes `payload` as indented JSON through `write_atomically`."""
    contents = json.dumps(payload, indent=2, default=str) + "\n"
    write_atomically(path, lambda stream: stream.write(contents), text=True)


def replace_atomically(path: str, write: Callable) -> str:
    """Runs `write(tmp)` on a temporary path beside `path`, then renames it there.

    For what is written by path rather than by stream: a folder (a SavedModel)
    or a file a library insists on naming (`model.save`, a `.tflite`). The
    temporary path has `path`'s base name, inside a hidden folder beside it, so
    writers that check the extension accept it. A kill or an error leaves
    `path` as it was (see `recover_interrupted` for a kill between moving the
    old one aside and renaming the new one in).

    Args:
        path: The file or folder to write.
        write: `callable(tmp_path)` that writes it.

    Returns:
        `path`.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    target = os.path.join(tmp, os.path.basename(path))
    old = None
    try:
        write(target)
        if os.path.isdir(path):
            # A folder cannot be renamed over another: move the old one aside.
            old = path + f".old-{os.getpid()}"
            os.replace(path, old)
        os.replace(target, path)
    except BaseException as error:
        if old is not None and not os.path.exists(path):
            os.replace(old, path)
            old = None
        failed = disk_error(error, path)
        if failed is not None:
            raise failed from error
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def recover_interrupted(path: str) -> None:
    """Cleans up after a `replace_atomically(path, ...)` that was killed part-way.

    Removes its temporary folders, and puts the previous folder back if the kill
    came in the instant between moving it aside and renaming the new one in.
    """
    parent, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        full = os.path.join(parent, entry)
        if entry.startswith(f".{name}.partial-"):
            shutil.rmtree(full, ignore_errors=True)
        elif entry.startswith(f"{name}.old-"):
            if not os.path.exists(path):
                os.replace(full, path)
            elif os.path.isdir(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                os.remove(full)

"""Atomic file writes: a file with its final name is always complete.

Everything is written to a temporary file ``.tmp-<random>-<name>`` in the destination folder,
then renamed over the final name (``os.replace`` is atomic on POSIX). An interrupted write leaves
only ``.tmp-*`` files, which readers and resumed runs ignore or clean up.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", fsync: bool = False):
    """Context manager yielding a file object; on success the file becomes ``path``.

    ``fsync=True`` flushes the data to disk before the rename (checkpoints, configs).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise

"""Atomic file writes: a file with its final name is always complete.

Everything is written to a temporary file ``.tmp-<random>-<name>`` in the destination folder,
then renamed over the final name (``os.replace`` is atomic on POSIX). An interrupted write leaves
only ``.tmp-*`` files, which readers and resumed runs ignore or clean up.

Temporary files and folders are created with the modes ``open()`` and ``mkdir`` use (0666 and
0777, less the process umask), not ``tempfile``'s private 0600 / 0700: a checkpoint or a sample
folder is as readable by the team as ``log.txt`` (0644 under the usual umask 022).
"""
from __future__ import annotations

import contextlib
import os
import secrets

TMP_PREFIX = ".tmp-"
_ATTEMPTS = 100


def _temporary(folder: str, name: str, create):
    """``create(path)`` on a fresh ``<folder>/.tmp-<random>-<name>``; returns (its result, path)."""
    for _ in range(_ATTEMPTS):
        path = os.path.join(folder, f"{TMP_PREFIX}{secrets.token_hex(4)}-{name}")
        try:
            return create(path), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name} in {folder} after {_ATTEMPTS} attempts")


def temporary_folder(parent: str, name: str) -> str:
    """A new empty folder ``<parent>/.tmp-<random>-<name>`` (mode 0777 less the umask), to fill
    and then rename into place."""
    return _temporary(parent, name, lambda path: os.mkdir(path, 0o777))[1]


@contextlib.contextmanager
def atomic_path(path, fsync: bool = True):
    """Context manager yielding a new temporary path next to ``path``; on success the file written
    there is flushed to disk (``fsync``) and renamed to ``path``. For writers that take a file name
    (``safetensors.torch.save_file`` streams tensors to it instead of building the file's bytes in
    memory); :func:`atomic_write` is the same for a file object.

    The file gets mode 0666 less the process umask, as ``open(path, "w")`` would give it. The
    rename replaces whatever has the name (a symbolic link, a file with other hard links) and never
    writes through it. An OSError names ``path`` (its ``filename``), whichever step failed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd, tmp = _temporary(folder, os.path.basename(path), lambda p: os.open(p, flags, 0o666))
    mode = os.fstat(fd).st_mode & 0o777  # a writer that recreates the file may not keep it
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(error, OSError) and error.filename in (None, tmp):
            error.filename = path  # "No space left on device" says which output could not be written
        raise


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", fsync: bool = False):
    """Context manager yielding a file object; on success the file becomes ``path`` (through
    :func:`atomic_path`: flushed to disk first with ``fsync=True``, as checkpoints and configs are)."""
    with atomic_path(path, fsync) as tmp:
        fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, mode) as f:
            yield f


def describe_write_error(error: BaseException) -> str:
    """A short reason for a failed write: `[Errno 28] No space left on device`, or torch's
    zip-writer failures (`unexpected pos`, `file write failed`) named as what they mean."""
    if isinstance(error, OSError):
        return f"[Errno {error.errno}] {error.strerror}" if error.errno else str(error)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "unexpected pos" in text or "write failed" in text or "inline_container" in text:
        return "the write failed part-way (disk full or quota exceeded?)"
    return text[:200]


@contextlib.contextmanager
def reported_write_errors(path, error_type, advice: str = ""):
    """An OSError while writing ``path`` (read-only folder, disk full, quota) becomes one
    ``error_type("cannot write <path>: [Errno 28] No space left on device<advice>")``."""
    try:
        yield
    except OSError as error:
        raise error_type(f"cannot write {path}: {describe_write_error(error)}{advice}") from None

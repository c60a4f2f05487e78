"""File-system helpers shared by convert, encode, verify and the readers: atomic writes, write
errors on a destination, ZIP access.

ZIP handles are opened lazily and per process (a handle inherited through fork shares its
file offset with the parent), and they are never pickled. A ZIP that is not one (truncated,
damaged) is one ValueError naming it; a damaged member one OSError naming the member.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import zipfile
import zlib

import numpy as np

from utils.atomic import atomic_write, describe_write_error

# ENOSPC, EDQUOT: the output is fine but full; rerunning after freeing space resumes.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DestinationWriteError(RuntimeError):
    """A write on the output failed (disk full, quota, read-only, no permission): the tool stops
    with this one line instead of going on (a destination error is not a bad source file).
    `exit_code` follows train.py: 1 when space ran out, 2 when the destination cannot be written."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # travels from pool workers to the parent
        return type(self), (str(self), self.exit_code)


@contextlib.contextmanager
def destination_writes(path: str, option: str = "--dest"):
    """An OSError inside becomes one DestinationWriteError naming `path` and what failed (`option`:
    the flag that chose the place). Wrap only writes on the destination: a source that cannot be
    read is another matter (a skipped file, a bad dataset)."""
    try:
        yield
    except OSError as error:
        if error.errno in NO_SPACE:
            raise DestinationWriteError(
                f"cannot write {path}: {describe_write_error(error)}; the complete files written so far are "
                "kept: free some space and rerun the same command to resume", exit_code=1) from None
        raise DestinationWriteError(f"cannot write {path}: {describe_write_error(error)}; "
                                    f"choose a {option} you can write to", exit_code=2) from None


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent or complete."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str, obj, indent: int | None = 1) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=indent).encode("utf-8"))


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def remove_temp_files(folder: str) -> int:
    """Delete the `.tmp-*` leftovers of an interrupted run under `folder`; returns how many."""
    count = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if name.startswith(".tmp-"):
                _remove_quietly(os.path.join(root, name))
                count += 1
    return count


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class ZipReader:
    """Read members of a ZIP archive; safe to pickle and to use after fork."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._zip = None
        self._pid = None

    def _handle(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, EOFError) as error:
                raise ValueError(f"{self.path!r} is not a readable ZIP archive ({error}); is it truncated or "
                                 "damaged? Copy or write it again") from None
            self._pid = os.getpid()
        return self._zip

    def namelist(self) -> list[str]:
        return self._handle().namelist()

    def infolist(self) -> list[zipfile.ZipInfo]:
        return self._handle().infolist()

    def read(self, name: str) -> bytes:
        try:
            return self._handle().read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:  # bad CRC, broken deflate stream
            raise OSError(f"damaged member {name!r} of the ZIP archive {self.path!r}: {error}") from None

    def getinfo(self, name: str) -> zipfile.ZipInfo:
        return self._handle().getinfo(name)

    def exists(self, name: str) -> bool:
        try:
            self._handle().getinfo(name)
            return True
        except KeyError:
            return False

    def close(self) -> None:
        if self._zip is not None and self._pid == os.getpid():
            self._zip.close()
        self._zip = None

    def __getstate__(self):
        return {"path": self.path, "_zip": None, "_pid": None}


def zip_folder(folder: str, zip_path: str, skip=("conversion_report.json",)) -> None:
    """Pack every file under `folder` (relative names, sorted) into `zip_path`, atomically.

    Members are stored without compression: PNG and .npy payloads gain little from deflate.
    """
    names = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if not name.startswith(".tmp-") and rel not in skip:
                names.append(rel)
    with atomic_write(zip_path, "wb") as out, zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for rel in sorted(names):
            # A fixed timestamp keeps the archive byte-identical across reruns.
            info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with open(os.path.join(folder, rel), "rb") as f:
                zf.writestr(info, f.read())

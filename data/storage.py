"""File-system helpers shared by convert, encode and the readers: atomic writes, ZIP access.

ZIP handles are opened lazily and per process (a handle inherited through fork shares its
file offset with the parent), and they are never pickled.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

from utils.atomic import atomic_write


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
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip

    def namelist(self) -> list[str]:
        return self._handle().namelist()

    def infolist(self) -> list[zipfile.ZipInfo]:
        return self._handle().infolist()

    def read(self, name: str) -> bytes:
        return self._handle().read(name)

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

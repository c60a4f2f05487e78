"""Listing a raw ImageNet-style source: a folder or ZIP of class sub-folders.

Labels are the indices of the sorted top-level folder names (torchvision ImageFolder order).
Unlike ImageFolder, an empty class folder keeps its label index (so labels stay stable) and
is reported instead of raising. Files are found recursively inside each class folder and
sorted by their path. Only files with an image extension are candidates; everything else is
listed as skipped with a reason.

Folder links are followed once: a link to a folder inside the source (its files are listed under
their own path already; `cat/loop -> ..` would list every class again under "cat", and two such
links recurse without end) or to a folder already visited (by real path) is not entered and is
listed in `skipped_links` with the reason. Neither is a folder that resolves to the destination of
the conversion (`exclude`), through a link or not: the output is never read back as a source.

ZIP members are checked before they are decompressed (`zip_member_problem`): one whose declared
size is beyond any image within PIL's pixel limit, or that expands like no image file does, raises
DecompressionBombError, so it is skipped with the reason like an image over PIL's pixel limit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from PIL import Image

from .storage import ZipReader

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


# Bytes per pixel of the largest raw encoding an image member can need (8-bit RGBA, uncompressed):
# a member that declares more than PIL's error limit (2 x MAX_IMAGE_PIXELS) times this is no image
# PIL would decode, and reading it would only fill a worker's memory.
MAX_BYTES_PER_PIXEL = 4
# Image files are compressed already; deflate gains them a few percent. A member over
# RATIO_CHECK_BYTES that expands more than MAX_ZIP_RATIO times is filler (zeros), not a photo.
MAX_ZIP_RATIO = 100
RATIO_CHECK_BYTES = 16 * 2**20


def zip_member_problem(info) -> str | None:
    """Why ZIP member `info` (a ZipInfo) must not be decompressed, or None when it may be."""
    pixels = Image.MAX_IMAGE_PIXELS
    limit = None if pixels is None else 2 * pixels * MAX_BYTES_PER_PIXEL
    if limit is not None and info.file_size > limit:
        return (f"the ZIP member declares {info.file_size} bytes uncompressed, more than any image within PIL's "
                f"pixel limit can hold ({limit} bytes = 2 x {pixels} pixels x {MAX_BYTES_PER_PIXEL} bytes); "
                "not decompressed")
    if info.file_size > RATIO_CHECK_BYTES and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
        return (f"the ZIP member expands {info.file_size // max(info.compress_size, 1)}:1 ({info.compress_size} -> "
                f"{info.file_size} bytes), more than {MAX_ZIP_RATIO}:1, which no image file does; not decompressed")
    return None


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass
class SourceListing:
    """What a raw source holds. `items` are (relative path, label); `skipped` (path, reason)."""

    classes: list[str]
    items: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    skipped_links: list[tuple[str, str]] = field(default_factory=list)  # (folder link, reason)


class RawSource:
    """A folder or ZIP of class sub-folders; `read(relpath)` returns a file's bytes. Folders in
    `exclude` (the conversion's destination) are never entered."""

    def __init__(self, path: str, exclude=()):
        self.path = os.fspath(path)
        self.exclude = tuple(os.path.realpath(p) for p in exclude)
        if not os.path.exists(self.path):
            raise FileNotFoundError(
                f"--source {self.path!r} does not exist; expected a folder or .zip of class sub-folders "
                "(e.g. ILSVRC/Data/CLS-LOC/train)"
            )
        self.is_zip = os.path.isfile(self.path)
        if self.is_zip and not self.path.lower().endswith(".zip"):
            raise ValueError(f"--source {self.path!r} is a file but not a .zip; "
                             "expected a folder or .zip of class sub-folders")
        self._zip = ZipReader(self.path) if self.is_zip else None

    def read(self, relpath: str) -> bytes:
        if self._zip is not None:
            problem = zip_member_problem(self._zip.getinfo(relpath))
            if problem:
                raise Image.DecompressionBombError(problem)
            return self._zip.read(relpath)
        with open(os.path.join(self.path, relpath), "rb") as f:
            return f.read()

    def list(self) -> SourceListing:
        links: list[tuple[str, str]] = []
        if self._zip is not None:
            files, dirs = self._zip_entries()
        else:
            files, dirs = self._folder_entries(links)
        classes = sorted(d for d in dirs if not _is_hidden(d))
        if not classes:
            raise ValueError(
                f"--source {self.path!r} holds no class sub-folders; expected one folder per class "
                "with the images inside (ImageNet train layout)"
            )
        label_of = {name: i for i, name in enumerate(classes)}
        per_class: dict[str, list[str]] = {name: [] for name in classes}
        skipped = []
        for rel in sorted(files):
            top, _, rest = rel.partition("/")
            if not rest:
                skipped.append((rel, "not inside a class folder"))
            elif top not in label_of:
                skipped.append((rel, "inside a hidden folder"))
            elif not is_image_name(rel):
                skipped.append((rel, f"not an image file (extension {os.path.splitext(rel)[1] or 'none'!r})"))
            else:
                per_class[top].append(rel)
        items = [(rel, label_of[name]) for name in classes for rel in per_class[name]]
        empty = [name for name in classes if not per_class[name]]
        return SourceListing(classes=classes, items=items, skipped=skipped, empty_classes=empty,
                             skipped_links=sorted(links))

    def _folder_entries(self, links: list) -> tuple[list[str], set[str]]:
        """Files (relative paths) and top-level folders; folder links that would repeat files or
        loop are not entered and are appended to `links` as (relative path, reason)."""
        files, dirs = [], set()
        with os.scandir(self.path) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=True):
                    reason = self._destination(entry.path)
                    if reason:  # not a class either: the labels must not depend on whether the output exists yet
                        links.append((entry.name, reason))
                    else:
                        dirs.add(entry.name)
                elif entry.is_file(follow_symlinks=True):
                    files.append(entry.name)
        root_real = os.path.realpath(self.path)
        visited = {root_real}

        def enter(path: str) -> bool:
            real = os.path.realpath(path)
            rel = os.path.relpath(path, self.path).replace(os.sep, "/")
            reason = self._destination(path)
            if reason:
                links.append((rel, reason))
                return False
            if os.path.islink(path) and (real == root_real or real.startswith(root_real + os.sep)):
                inside = os.path.relpath(real, root_real).replace(os.sep, "/")
                where = "the source folder itself" if inside == "." else f"{inside!r} inside the source"
                links.append((rel, f"links to {where}, whose files are listed under their own path"))
                return False
            if real in visited:
                links.append((rel, f"links to {real}, a folder already visited"))
                return False
            visited.add(real)
            return True

        for top in sorted(dirs):
            if _is_hidden(top) or not enter(os.path.join(self.path, top)):
                continue
            for root, subdirs, names in os.walk(os.path.join(self.path, top), followlinks=True):
                subdirs[:] = [d for d in sorted(subdirs) if not _is_hidden(d) and enter(os.path.join(root, d))]
                rel_root = os.path.relpath(root, self.path).replace(os.sep, "/")
                files.extend(f"{rel_root}/{n}" for n in names)
        return files, dirs

    def _destination(self, path: str) -> str | None:
        """The reason `path` is not entered when it resolves into an excluded folder, else None."""
        real = os.path.realpath(path)
        for folder in self.exclude:
            if real == folder or real.startswith(folder + os.sep):
                return f"links to {real}, the destination of this conversion, which is never read as a source"
        return None

    def _zip_entries(self) -> tuple[list[str], set[str]]:
        files, dirs = [], set()
        for info in self._zip.infolist():
            name = info.filename
            if "/" in name.rstrip("/"):
                dirs.add(name.split("/", 1)[0])
            if info.is_dir():
                dirs.add(name.rstrip("/").split("/", 1)[0])
                continue
            parts = name.split("/")
            if any(_is_hidden(p) for p in parts[:-1]):
                continue
            files.append(name)
        return files, dirs

"""Opening the files of run and sample folders: regular files only, never through a link.

A run folder (`<output_dir>/<exp_name>/`) and a sample folder (`<sample_dir>/<run_name>/` and the
records beside it) hold files this code reads, appends to and creates. Anyone who can write in
the folder can plant something else under one of those names: a symbolic link to a file outside
the run (the run would truncate or append to its target), a FIFO (opening it blocks for ever), a
device, a folder. :func:`open_regular` is the one way such a file is opened:

- ``O_NOFOLLOW``: a symbolic link as the last component is refused, never followed (the folders
  above it may be links: a run folder on another disk is a link users make on purpose);
- ``O_NONBLOCK`` while opening, so a FIFO cannot block; then ``fstat`` on the open descriptor
  (no race between a check and the open) and anything but a regular file is refused;
- a file opened for writing must have one hard link, or appending to it would change another
  name's file too.

A refused file is one :class:`NotRegularFile` (an OSError) whose message names the file and what
it is. Files written whole go through :func:`utils.atomic.atomic_write` (a new temporary file
renamed over the name), which replaces a planted link or hard link and never writes through it.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Optional

# open() mode -> flags; every mode also gets O_NOFOLLOW (unless follow_links) and O_NONBLOCK
_FLAGS = {
    "r": os.O_RDONLY,
    "a": os.O_WRONLY | os.O_APPEND | os.O_CREAT,
    "a+": os.O_RDWR | os.O_APPEND | os.O_CREAT,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
}
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class NotRegularFile(OSError):
    """A name in a run or sample folder that is not a regular file of its own (a symbolic link, a
    FIFO, a folder, a device, a file with other hard links); the message names it and says so."""

    def __init__(self, path: str, what: str):
        super().__init__(f"{path} is {what}, not a regular file; this code never reads or writes through "
                         f"such a name: move it away and start again")
        self.path, self.what = os.fspath(path), what

    def __str__(self) -> str:
        return self.args[0]


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def describe_non_regular(path: str) -> Optional[str]:
    """What `path` itself is when it is not a regular file ("a symbolic link to /etc/passwd", "a
    FIFO (named pipe)", "a folder", ...), from `lstat` (a link is never followed); None for a
    regular file or a missing name."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        try:
            return f"a symbolic link (to {os.readlink(path)})"
        except OSError:
            return "a symbolic link"
    return None if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)


def check_regular(paths) -> None:
    """NotRegularFile for the first of `paths` that exists and is not a regular file of its own (a
    folder's names checked before anything is written, so a planted one stops a run at its start)."""
    for path in paths:
        what = describe_non_regular(path)
        if what is not None:
            raise NotRegularFile(path, what)


def is_regular_file(path: str) -> bool:
    """Whether `path` itself (not a link's target) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def open_regular(path, mode: str = "r", encoding: Optional[str] = None, follow_links: bool = False):
    """`open(path, mode)` for a file that must be a regular file of its own.

    `mode`: "r", "a", "a+" or "x", each with an optional "b" (text modes use `encoding`, default
    UTF-8). `follow_links=True` for a file the user named (a `--config` may be a link): only the
    regular-file check applies. Raises :class:`NotRegularFile` for a link, FIFO, folder, device or
    (writing) a file with other hard links, FileNotFoundError for a missing file (reading), other
    OSErrors as the system gives them. Never blocks on a FIFO."""
    path = os.fspath(path)
    binary = "b" in mode
    base = mode.replace("b", "")
    if base not in _FLAGS:
        raise ValueError(f"open_regular: mode {mode!r} is not one of r, a, a+, x (with an optional b)")
    flags = _FLAGS[base] | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as error:
        what = None if follow_links else describe_non_regular(path)
        if what is None and error.errno in (errno.EISDIR, errno.ENXIO, errno.ELOOP):
            what = describe_non_regular(os.path.realpath(path)) or "not a regular file"
        if what is not None and error.errno != errno.ENOENT:
            raise NotRegularFile(path, what) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, _kind(st.st_mode))
        if base != "r" and st.st_nlink > 1:
            raise NotRegularFile(path, f"a file with {st.st_nlink} hard links (writing to it would change the others)")
        os.set_blocking(fd, True)
        if binary:
            return os.fdopen(fd, base + "b")
        return os.fdopen(fd, base, encoding=encoding or "utf-8")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, max_bytes: int, what: str, follow_links: bool = False) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (the size is checked before reading, and
    at most `max_bytes + 1` bytes are read, so a file that grows meanwhile is caught too). ValueError
    naming `what` and the limit for a larger file; otherwise as :func:`open_regular`."""
    with open_regular(path, "rb", follow_links=follow_links) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(max_bytes + 1) if size <= max_bytes else b""
    if size > max_bytes or len(data) > max_bytes:
        raise ValueError(f"{what} {path} is {_size(max(size, len(data)))}, more than the {_size(max_bytes)} such a "
                         "file ever needs: is it the right file?")
    return data


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"

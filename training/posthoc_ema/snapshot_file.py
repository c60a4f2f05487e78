"""One post-hoc EMA snapshot file, read without trusting it: `<run>/posthoc_ema/<step:07d>.safetensors`.

A snapshot is a ``.safetensors`` file (models/weights_io.export_weights) holding every profile's
weights as groups ``p0``, ``p1``, ... and in its header the arch, the training config, ``steps``
and ``weights_info``::

    {"kind": "posthoc_ema_snapshot", "run": "20261207T090246Z-1a2b3c4d", "stds": [0.05, 0.1], "t": 1000}

(``legacy_upto: S`` in a run resumed from a checkpoint of an earlier version: its snapshots up to
step S carry no ``run``). Snapshots written before run identities existed have no ``run`` (and are
float32); they read the same way.

The file is opened without following links and must be a regular file (a fifo or a device under a
snapshot's name is refused before any read, so it cannot hang the tool). The header is parsed here,
with a size bound, and checked completely before any tensor is read: names, dtypes, exact shapes,
offsets inside the file, the file complete, the step in the header equal to the step in the name,
t an integer in [1, step], the stds valid. Tensors are then read one at a time at their offsets
(``SnapshotFile.tensor``), and a floating tensor that is not finite is refused.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from training.posthoc_ema.kernels import std_problem

KIND = "posthoc_ema_snapshot"
NAME = re.compile(r"^(\d{7,})\.safetensors$")
RUN_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_-]{0,63}$")
MAX_HEADER_BYTES = 16 << 20  # 2 profiles of SiT-XL/2 take ~0.2 MB; a config is a few kB
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
          "BOOL": torch.bool}


class SnapshotError(ValueError):
    """A snapshot file that cannot be used (the message names the file and why)."""


@dataclass
class Snapshot:
    """What a snapshot's header says, checked. `tensors`: name -> (dtype, shape, start, end), offsets
    relative to the file (already past the header); `run` is "" for snapshots without identity."""
    path: str
    step: int
    t: int
    stds: List[float]
    run: str
    legacy_upto: Optional[int]
    arch: dict
    config: Optional[dict]
    tensors: Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]] = field(repr=False)

    def layout(self) -> Dict[str, Tuple[bool, Tuple[int, ...]]]:
        """name -> (floating?, shape): what two snapshots of one run share (dtypes may differ: old
        snapshots are float32, new ones float16)."""
        return {name: (dtype.is_floating_point, shape) for name, (dtype, shape, _, _) in self.tensors.items()}

    def keys(self) -> List[str]:
        """The model's state-dict keys (those of profile p0)."""
        return [name[3:] for name in self.tensors if name.startswith("p0.")]


def step_of(path: str) -> Optional[int]:
    match = NAME.match(os.path.basename(path))
    return int(match.group(1)) if match else None


def open_snapshot(path: str) -> int:
    """A read-only descriptor of `path`, which must be a regular file reached without a symbolic link
    (`utils.regular_files.open_regular`: a FIFO never blocks); SnapshotError (one line) otherwise."""
    from utils.regular_files import NotRegularFile, open_regular

    try:
        f = open_regular(path, "rb")
    except NotRegularFile as e:
        raise SnapshotError(f"post-hoc EMA snapshot {e.path} is {e.what}, not a snapshot file; remove it "
                            "(snapshots are read from regular files only, never through links)") from None
    except OSError as e:
        raise SnapshotError(f"cannot open post-hoc EMA snapshot {path}: {e.strerror or e}") from None
    fd = os.dup(f.fileno())
    f.close()
    return fd


def _read_exactly(fd: int, buffer, offset: int, path: str) -> None:
    view, got = memoryview(buffer).cast("B"), 0
    while got < len(view):
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except OSError as e:
            raise SnapshotError(f"cannot read post-hoc EMA snapshot {path}: {e.strerror or e}") from None
        if n == 0:
            raise SnapshotError(f"post-hoc EMA snapshot {path} is truncated (it changed while being read?)")
        got += n


def _damaged(path: str, why: str) -> SnapshotError:
    return SnapshotError(f"post-hoc EMA snapshot {path} is damaged ({why}); delete it (the others still "
                         "reconstruct) or copy it again")


def _parse(fd: int, path: str) -> Snapshot:
    from models.weights_io import SAFETENSORS_FORMAT, header_fields

    size = os.fstat(fd).st_size
    head = bytearray(8)
    if size < 8:
        raise _damaged(path, f"{size} bytes, not a safetensors file")
    _read_exactly(fd, head, 0, path)
    (length,) = struct.unpack("<Q", head)
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise _damaged(path, f"a header of {length} bytes in a file of {size}")
    raw = bytearray(length)
    _read_exactly(fd, raw, 8, path)
    try:
        header = json.loads(raw.decode("utf-8"))
        meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("no header metadata")
        if meta.get("format") != SAFETENSORS_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, not {SAFETENSORS_FORMAT!r}")
        fields = header_fields(meta)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _damaged(path, f"unreadable header: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}")
    tensors = _tensor_table(header, path, size - 8 - length, 8 + length)
    return _snapshot(path, fields, tensors)


def _tensor_table(header: dict, path: str, data_bytes: int, data_start: int) -> dict:
    tensors, end_max = {}, 0
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            start, end = entry["data_offsets"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, start, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise _damaged(path, f"tensor {name[:80]!r} has no valid dtype, shape and offsets") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - start != nbytes or end > data_bytes:
            raise _damaged(path, f"tensor {name[:80]!r} of shape {list(shape)} does not fit its offsets "
                                 f"[{start}, {end}] in {data_bytes} bytes of data")
        tensors[name] = (dtype, shape, data_start + start, data_start + end)
        end_max = max(end_max, end)
    if end_max != data_bytes:
        raise _damaged(path, f"{data_bytes} bytes of data, but the tensors end at byte {end_max}")
    return tensors


def _snapshot(path: str, fields: dict, tensors: dict) -> Snapshot:
    info, step = fields.get("weights_info"), step_of(path)
    if not isinstance(info, dict) or info.get("kind") != KIND:
        raise _damaged(path, "its header does not describe a post-hoc EMA snapshot")
    stds, t, run, upto = info.get("stds"), info.get("t"), info.get("run", ""), info.get("legacy_upto")
    problems = []
    if fields.get("steps") != step:
        problems.append(f"its header says step {fields.get('steps')}, its name step {step}")
    if not isinstance(stds, list) or not stds or len(set(map(str, stds))) < len(stds) or \
            any(std_problem(s) for s in stds):
        problems.append(f"stds {str(stds)[:80]} are not distinct relative stds of power-function EMAs")
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= (step or 0):
        problems.append(f"t={str(t)[:40]} is not an integer in [1, {step}]")
    if not isinstance(run, str) or (run and not RUN_ID.match(run)):
        problems.append(f"run {str(run)[:80]!r} is no run identity")
    if upto is not None and (isinstance(upto, bool) or not isinstance(upto, int) or upto < 0):
        problems.append(f"legacy_upto={str(upto)[:40]} is not a step")
    if not isinstance(fields.get("arch"), dict):
        problems.append("it stores no arch")
    if not problems:
        groups = {name.partition(".")[0] for name in tensors}
        if groups != {f"p{i}" for i in range(len(stds))}:
            problems.append(f"its tensor groups {sorted(groups)[:8]} are not one per std (p0 to p{len(stds) - 1})")
        else:
            layouts = [{n.partition(".")[2]: tensors[n][1] for n in tensors if n.startswith(f"p{i}.")}
                       for i in range(len(stds))]
            if any(layout != layouts[0] for layout in layouts) or not layouts[0]:
                problems.append("its profiles do not hold the same tensors")
    if problems:
        raise _damaged(path, "; ".join(problems))
    config = fields.get("config") if isinstance(fields.get("config"), dict) else None
    return Snapshot(path, step, t, [float(s) for s in stds], run, upto, fields["arch"], config, tensors)


def read_header(path: str) -> Snapshot:
    """The checked header of the snapshot at `path` (SnapshotError when it is none)."""
    fd = open_snapshot(path)
    try:
        return _parse(fd, path)
    finally:
        os.close(fd)


class SnapshotFile:
    """An open snapshot whose header still says what `expected` says (the file was not replaced since
    it was listed); `tensor(name)` reads one tensor. Use as a context manager: the file is closed after."""

    def __init__(self, expected: Snapshot):
        self.snapshot = expected
        self._fd = open_snapshot(expected.path)
        try:
            if _parse(self._fd, expected.path) != expected:
                raise SnapshotError(f"post-hoc EMA snapshot {expected.path} changed while the reconstruction ran; "
                                    "run it again when nothing writes the snapshots")
        except BaseException:
            os.close(self._fd)
            raise

    def tensor(self, name: str, check: bool = True) -> torch.Tensor:
        """The tensor `name` in its exact shape, floating ones as float32 (float16 converts exactly);
        SnapshotError when a floating one is not finite (`check=False`: the caller checks what it makes
        of it, a sum that any non-finite term makes non-finite)."""
        dtype, shape, start, end = self.snapshot.tensors[name]
        raw = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            _read_exactly(self._fd, raw.numpy(), start, self.snapshot.path)
        value = raw.view(dtype).reshape(shape)
        if not dtype.is_floating_point:
            return value
        value = value.float()
        if check and not bool(torch.isfinite(value).all()):
            raise SnapshotError(f"post-hoc EMA snapshot {self.snapshot.path} holds non-finite weights ({name}); "
                                "delete it (the others still reconstruct) or copy it again")
        return value

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "SnapshotFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

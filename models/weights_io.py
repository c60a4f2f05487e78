"""Reading checkpoint files without running code from them, and writing ``.safetensors`` weights.

``.pt`` files are pickles: a full ``torch.load`` can call any Python function the file names
(a ``__reduce__`` payload runs on load). We load with ``weights_only=True``, which rebuilds only
tensors, plain containers and numbers, plus these allow-listed harmless types:

- ``argparse.Namespace``: REPA's, ELIT's and SiT's ``train.py`` store their ``args`` in every
  checkpoint (strings, numbers, lists, None);
- numpy scalars and numeric dtypes (``np.float64(0.1)`` in a config dict of some forks).

Anything else needs ``trust_checkpoint=True`` (``--trust-checkpoint``), which unpickles fully.

``.safetensors`` files hold only tensors and a JSON header, so they are always safe. Ours store
each state dict under a prefix (``ema.`` / ``model.``) and the architecture and training config as
JSON strings in the header metadata::

    {"format": "dfm-weights", "version": "1", "groups": '["ema"]', "arch": '{...}', "config": '{...}'}

:func:`read_weights_file` returns the same dict shape as a ``torch.load`` of our ``.pt``
checkpoints (``{"ema": {...}, "arch": {...}, "config": {...}}``); a foreign ``.safetensors``
(a plain state dict) comes back as that state dict.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from typing import Dict, Mapping, Optional

import numpy as np
import torch

from utils.atomic import atomic_path
from utils.records import RecordError, parse_json

SAFETENSORS_FORMAT = "dfm-weights"
# header fields stored as JSON text: the architecture, the training config, and what the weights are
# (`weights_info`, e.g. {"kind": "posthoc_ema", "std": 0.08} for a post-hoc EMA reconstruction)
JSON_FIELDS = ("arch", "config", "weights_info")
SAFETENSORS_VERSION = "1"
HEADER_FIELD_BYTES = 1 << 20  # a config or arch is a few KiB
_NUMERIC_DTYPES = ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
                   "Byte", "Short", "Int", "Long", "LongLong", "UByte", "UShort", "UInt", "ULong", "ULongLong",
                   "Float16", "Float32", "Float64", "LongDouble", "Complex64", "Complex128", "CLongDouble")


def safe_globals() -> list:
    """The non-tensor types a ``weights_only`` load may rebuild (none of them can run code)."""
    scalar = np._core.multiarray.scalar
    found = [argparse.Namespace, scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    found += [getattr(np.dtypes, f"{name}DType") for name in _NUMERIC_DTYPES if hasattr(np.dtypes, f"{name}DType")]
    return found


class UntrustedCheckpointError(ValueError):
    """The file needs full unpickling (it names Python objects beyond tensors and plain data).

    ``names``: the objects it names (``builtins.open``, ...), as far as torch can list them.
    """

    def __init__(self, message: str, names=()):
        super().__init__(message)
        self.names = list(names)


def is_safetensors(path: str) -> bool:
    return os.fspath(path).lower().endswith(".safetensors")


def unsafe_globals(path: str, error: Exception) -> list:
    """The Python objects a refused pickle names (``builtins.open``, ...)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - the legacy format: read the name from the error
        return re.findall(r"GLOBAL (\S+) was not an allowed global", str(error))


def describe_globals(names) -> str:
    """``"builtins.open, os.system and 3 more"`` (at most six named)."""
    names = list(names)
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "") or "unknown objects"


def _untrusted_message(path: str, names) -> str:
    what = describe_globals(names)
    return (f"refusing to fully unpickle checkpoint {path}: besides tensors and plain data it names Python "
            f"objects ({what}). Unpickling runs whatever code the file asks for (arbitrary code execution), "
            "so a malicious or tampered .pt can take over your account. If, and only if, you trust where this "
            "file came from, load it with --trust-checkpoint (trust_checkpoint=True in Python); better, "
            "convert it once to .safetensors (models.weights_io.export_checkpoint) and share that.")


def _legacy_message(path: str, error: Exception) -> str:
    return (f"refusing to fully unpickle checkpoint {path}: it is in torch's legacy (non-zip) pickle format, which "
            f"the safe reader cannot parse ({weights_only_reason(error)}), and fully unpickling it can run code. If, "
            "and only if, you trust where this file came from, load it with --trust-checkpoint (trust_checkpoint=True "
            "in Python); better, convert it once to .safetensors (models.weights_io.export_checkpoint).")


def weights_only_reason(error: Exception) -> str:
    """What torch's weights-only reader could not parse, without torch's advice to set weights_only=False:
    'Unsupported operand 149' (or the first line of any other error)."""
    text = str(error)
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return detail.group(1).strip() if detail else (text.strip().splitlines() or [type(error).__name__])[0]


def is_legacy_torch_file(path: str) -> bool:
    """A `torch.save(..., _use_new_zipfile_serialization=False)` file: its first pickle is torch's magic number."""
    magic = torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
    with open(path, "rb") as f:
        return magic in f.read(64)


def _is_weights_only_refusal(error: Exception) -> bool:
    """True when torch refused an object the file names (not when the file is garbage)."""
    text = str(error).lower()
    return isinstance(error, pickle.UnpicklingError) and ("unsupported global" in text or "unsupported class" in text)


def torch_load_cpu(path: str, trust_checkpoint: bool = False):
    """``torch.load`` on CPU: ``weights_only=True`` with :func:`safe_globals` allowed, memory-mapped
    where the format allows it; full unpickling only with ``trust_checkpoint=True``.

    Raises UntrustedCheckpointError (a ValueError) when the file needs full unpickling and is not
    trusted; other failures (truncated, not a PyTorch file) propagate as raised by torch.
    """
    attempts = [{"mmap": True}, {}]  # the legacy (non-zip) format cannot be memory-mapped
    with torch.serialization.safe_globals(safe_globals()):
        error = None
        for kwargs in attempts:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
            except Exception as e:  # noqa: BLE001 - each variant fails differently
                error = e if error is None or not _is_weights_only_refusal(error) else error
        legacy = "weights only load failed" in str(error).lower() and is_legacy_torch_file(path)
        if not (_is_weights_only_refusal(error) or legacy):
            raise error
    if not trust_checkpoint:
        if not _is_weights_only_refusal(error):  # the legacy format the safe reader cannot parse
            raise UntrustedCheckpointError(_legacy_message(path, error), []) from None
        names = unsafe_globals(path, error)
        raise UntrustedCheckpointError(_untrusted_message(path, names), names) from None
    for kwargs in attempts:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, **kwargs)
        except Exception as e:  # noqa: BLE001
            error = e
    raise error


def read_weights_file(path: str) -> dict:
    """A ``.safetensors`` file as a checkpoint dict (see the module docstring)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if meta.get("format") != SAFETENSORS_FORMAT:
        return tensors
    groups = parse_json(meta.get("groups", "[]"), f"{path}: header field groups", HEADER_FIELD_BYTES)
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise ValueError(f"{path}: header field groups is {groups!r}, not a list of names")
    checkpoint: dict = {g: {} for g in groups}
    for name, tensor in tensors.items():
        group, _, key = name.partition(".")
        if group not in checkpoint:
            raise ValueError(f"{path}: tensor {name!r} belongs to none of the groups {groups}")
        checkpoint[group][key] = tensor
    checkpoint.update(header_fields(meta, path))
    return checkpoint


def header_fields(meta: Mapping[str, str], where: str = "weights header") -> dict:
    """The JSON fields (``arch``, ``config``, ``weights_info``) and ``steps`` of a header written by
    :func:`export_weights`, without reading any tensor. The fields are read as records from outside
    (utils/records.py): plain data, at most HEADER_FIELD_BYTES each, never interpolated; a field that
    is not is one ValueError (RecordError) naming `where` and the field."""
    fields = {key: parse_json(meta[key], f"{where}: header field {key}", HEADER_FIELD_BYTES)
              for key in JSON_FIELDS if meta.get(key)}
    if meta.get("steps"):
        steps = str(meta["steps"]).strip()
        if not steps.isdigit() or len(steps) > 18:
            raise RecordError(f"{where}: header field steps is {steps[:40]!r}, not a step count")
        fields["steps"] = int(steps)
    return fields


def _detached_copies(state: Mapping[str, torch.Tensor], prefix: str, seen: set) -> Dict[str, torch.Tensor]:
    """CPU, contiguous tensors; a tensor sharing storage with one already taken is cloned
    (safetensors refuses shared storage)."""
    out = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[f"{prefix}.{key}"] = t
    return out


def export_weights(path: str, state_dicts: Mapping[str, Mapping[str, torch.Tensor]], arch: Optional[dict] = None,
                   config: Optional[dict] = None, steps: Optional[int] = None,
                   weights_info: Optional[dict] = None) -> str:
    """Write model weights as ``.safetensors`` (atomically) that :func:`models.load_pretrained`,
    ``generate.py --ckpt`` and :func:`models.read_checkpoint` read back.

    ``state_dicts``: ``{"ema": ema.state_dict()}`` and/or ``{"model": ...}`` (names without a
    dot). ``arch``: the ``create_model`` arguments (``model.arch``); ``config``: the training
    config as a plain dict; ``weights_info``: what the weights are (a post-hoc EMA reconstruction,
    say); all stored as JSON text in the header. Returns ``path``.
    """
    path = os.fspath(path)
    if not is_safetensors(path):
        raise ValueError(f"export path {path!r} must end in .safetensors")
    if not state_dicts or any("." in g or not g for g in state_dicts):
        raise ValueError(f"state_dicts needs names without dots, e.g. {{'ema': ...}}, got {list(state_dicts)}")
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    seen: set = set()
    for group, state in state_dicts.items():
        tensors.update(_detached_copies(state, group, seen))
    meta = {"format": SAFETENSORS_FORMAT, "version": SAFETENSORS_VERSION, "groups": json.dumps(list(state_dicts))}
    if arch is not None:
        meta["arch"] = json.dumps(dict(arch))
    if config is not None:
        meta["config"] = json.dumps(config, default=str)
    if steps is not None:
        meta["steps"] = str(int(steps))
    if weights_info is not None:
        meta["weights_info"] = json.dumps(weights_info, default=str)
    with atomic_path(path) as tmp:  # streamed: no second copy of the weights in memory (2.7 GB for an XL/2 snapshot)
        save_file(tensors, tmp, metadata=meta)
    return path


def export_checkpoint(src: str, dest: str, groups=("ema",), trust_checkpoint: bool = False) -> str:
    """Convert a ``.pt`` checkpoint into ``.safetensors`` weights (the groups it holds among
    `groups`, or its plain state dict as ``ema``), keeping ``arch``/``config``/``steps``."""
    checkpoint = torch_load_cpu(src, trust_checkpoint)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {src} holds a {type(checkpoint).__name__}, not a dict")
    chosen = {g: checkpoint[g] for g in groups if isinstance(checkpoint.get(g), dict)}
    if not chosen:
        chosen = {"ema": checkpoint}
    arch = checkpoint.get("arch") if isinstance(checkpoint.get("arch"), dict) else None
    config = checkpoint.get("config")
    if config is None and isinstance(checkpoint.get("args"), argparse.Namespace):
        config = vars(checkpoint["args"])
    steps = checkpoint.get("steps")
    steps = int(steps) if isinstance(steps, (int, np.integer)) else None
    return export_weights(dest, chosen, arch, config if isinstance(config, dict) else None, steps)

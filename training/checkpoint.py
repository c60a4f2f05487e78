"""Checkpoint files: atomic writes, keep-last-K, and finding the newest complete one.

A checkpoint is `<exp>/checkpoints/<step:07d>.pt`, a `torch.save` dict (docs/API_CONTRACT.md):
`model`, `ema` (state dicts, keys as SPEC §3), `opt`, `arch`, `config` (plain dict), `steps`,
`rng` (one entry per process), `data_position`. Only plain containers, numbers, strings and
tensors are stored, so `torch.load(..., weights_only=True)` reads it.

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over the final
name, so a crash leaves either the old state or the complete new file, never half a file.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import torch

from utils.atomic import atomic_write

CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")
REQUIRED_KEYS = ("model", "ema", "opt", "steps")


def checkpoint_dir(exp_dir: str) -> str:
    return os.path.join(exp_dir, "checkpoints")


def checkpoint_path(exp_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(exp_dir), f"{step:07d}.pt")


def atomic_torch_save(obj, path: str) -> None:
    with atomic_write(path, "wb", fsync=True) as f:
        torch.save(obj, f)


def list_checkpoints(exp_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of the checkpoint files in `exp_dir`, oldest first."""
    folder = checkpoint_dir(exp_dir)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = CHECKPOINT_NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def remove_stale_temporaries(exp_dir: str) -> None:
    folder = checkpoint_dir(exp_dir)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".tmp-"):
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:
                    pass


def prune_checkpoints(exp_dir: str, keep: Optional[int]) -> list[str]:
    """Delete all but the newest `keep` checkpoints (None = keep all); returns deleted paths."""
    if keep is None:
        return []
    ckpts = list_checkpoints(exp_dir)
    doomed = [path for _, path in ckpts[:-keep]] if len(ckpts) > keep else []
    for path in doomed:
        os.remove(path)
    return doomed


def load_checkpoint(path: str) -> dict:
    """Load and sanity-check one checkpoint (on CPU). Raises ValueError if it is not complete."""
    try:
        # mmap: every process of a large run reads the file without holding a private copy
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise ValueError(f"{path} is not a training checkpoint (needs keys {list(REQUIRED_KEYS)})")
    return state


def find_resume_checkpoint(exp_dir: str) -> tuple[Optional[str], Optional[dict]]:
    """Newest checkpoint of `exp_dir` that loads completely; corrupt ones are skipped with a
    warning. Returns (path, state) or (None, None) when there is none."""
    for step, path in reversed(list_checkpoints(exp_dir)):
        try:
            return path, load_checkpoint(path)
        except ValueError as e:
            warnings.warn(f"skipping corrupt checkpoint {path}: {e}", stacklevel=2)
    return None, None

"""Checkpoint files: atomic writes, keep-last-K, and finding the newest complete one.

A checkpoint is `<exp>/checkpoints/<step:07d>.pt`, a `torch.save` dict (docs/API_CONTRACT.md):
`model`, `ema` (state dicts, keys as SPEC §3), `opt`, `arch`, `config` (plain dict), `steps`,
`rng` (one entry per process), `data_position`. Only plain containers, numbers, strings and
tensors are stored, so `torch.load(..., weights_only=True)` reads it.

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over the final
name, so a crash leaves either the old state or the complete new file, never half a file.

Every checkpoint gets a SHA-256 sidecar `<step:07d>.pt.sha256` (utils/checksum.py), hashed
while the file is written and published just before the `.pt` is renamed into place, so every
published `.pt` has one. Resume and `load_checkpoint` verify it; a damaged file is skipped
like a truncated one. Files without a sidecar (older runs) load unverified.

The `steps` field decides where a resumed run continues and which files it writes next, so it
is checked too: a non-negative integer, equal to the step in the file name for a file in an
experiment's `checkpoints/` folder. A file that fails is damaged like one with a bad checksum.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import torch

from utils.atomic import atomic_write
from utils.records import check_record
from utils.regular_files import is_regular_file
from utils.checksum import SUFFIX as SIDECAR_SUFFIX
from utils.checksum import ChecksumMismatchError, HashingWriter, sidecar_path, verify_file, write_sidecar

CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")
REQUIRED_KEYS = ("model", "ema", "opt", "steps")
RECORD_KEYS = ("config", "arch")


def checkpoint_dir(exp_dir: str) -> str:
    return os.path.join(exp_dir, "checkpoints")


def checkpoint_path(exp_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(exp_dir), f"{step:07d}.pt")


def atomic_torch_save(obj, path: str, checksum: bool = True) -> None:
    """`torch.save` to `path` atomically; with `checksum`, also `path.sha256` (written before
    the rename, so a published `.pt` always has its sidecar). The file is then known verified
    in this process (see :func:`is_verified`)."""
    with atomic_write(path, "wb", fsync=True) as f:
        writer = HashingWriter(f) if checksum else f
        torch.save(obj, writer)
        if checksum:
            write_sidecar(path, writer.hexdigest())
    _VERIFIED[path] = _identity(path)


def _scan(exp_dir: str) -> tuple[list, list]:
    """([(step, path)] of the regular files named like checkpoints, oldest first; [paths] of the
    look-alikes: folders, symlinks, fifos, devices under a checkpoint's name (utils/regular_files.py:
    a link is never followed, a FIFO never opened))."""
    folder = checkpoint_dir(exp_dir)
    if not os.path.isdir(folder):
        return [], []
    found, others = [], []
    for name in os.listdir(folder):
        m = CHECKPOINT_NAME.match(name)
        if not m:
            continue
        path = os.path.join(folder, name)
        if not os.path.lexists(path):
            continue
        (found.append((int(m.group(1)), path)) if is_regular_file(path) else others.append(path))
    return sorted(found), sorted(others)


def list_checkpoints(exp_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of the checkpoint files in `exp_dir`, oldest first: regular files only (a
    folder, symlink or fifo under a checkpoint's name is never read: opening a fifo would hang)."""
    return _scan(exp_dir)[0]


# path -> (size, mtime_ns) of the files this process knows to be complete and intact
_VERIFIED: dict = {}


def _identity(path: str):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def is_verified(path: str) -> bool:
    """Whether `path` is an intact checkpoint: written by this process, or matching its `.sha256`
    sidecar (hashed once per process and file version), or, without a sidecar (older runs), a
    complete torch zip archive. Never raises for a damaged file."""
    try:
        identity = _identity(path)
        if _VERIFIED.get(path) == identity:
            return True
        if os.path.exists(sidecar_path(path)):
            ok = verify_file(path)
        else:
            with zipfile.ZipFile(path) as archive:
                ok = any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (OSError, ValueError, zipfile.BadZipFile, ChecksumMismatchError):
        return False
    if ok:
        _VERIFIED[path] = identity
    return ok


def remove_stale_temporaries(exp_dir: str) -> None:
    """Delete `.tmp-*` files and sidecars whose checkpoint was never published (a crash
    between the two renames of `atomic_torch_save`)."""
    remove_temporaries(checkpoint_dir(exp_dir))


def remove_temporaries(folder: str) -> None:
    """Delete the `.tmp-*` files that interrupted atomic writes (utils/atomic.py) left in `folder`, and
    `.sha256` sidecars whose file was never published. Only for a folder of the run this process holds
    the lock of: a temporary of a writer still at work would go too."""
    if os.path.isdir(folder):
        names = set(os.listdir(folder))
        for name in names:
            orphan = name.endswith(SIDECAR_SUFFIX) and name[:-len(SIDECAR_SUFFIX)] not in names
            if name.startswith(".tmp-") or orphan:
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:
                    pass


@dataclass
class Pruned:
    """What :func:`prune_checkpoints` did: the checkpoints it removed, and the files it left alone
    because they are not intact checkpoints of this run (damaged ones, look-alikes)."""
    removed: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.removed)

    def __iter__(self):
        return iter(self.removed)

    def __eq__(self, other) -> bool:
        return list(self.removed) == list(other) if isinstance(other, list) else NotImplemented


def prune_checkpoints(exp_dir: str, keep: Optional[int], protect: Optional[str] = None) -> Pruned:
    """Keep the newest `keep` intact checkpoints (None = keep all) and delete the older intact ones.

    Only verified checkpoints (:func:`is_verified`) count and only they are removed: a damaged file
    (kept for a look, as resume keeps it) or a look-alike (a folder, symlink or fifo under a
    checkpoint's name) is never counted, never removed and never opened beyond its checksum, and
    the newest verified checkpoint and `protect` (the one just written) always stay, whatever
    their step numbers say."""
    found, others = _scan(exp_dir)
    if keep is None:
        return Pruned()
    good = [(step, path) for step, path in found if is_verified(path)]
    damaged = [path for _, path in found if path not in {p for _, p in good}]
    doomed = [path for _, path in good[:-keep]] if len(good) > keep else []
    doomed = [path for path in doomed if path != protect and (not good or path != good[-1][1])]
    for path in doomed:
        os.remove(path)
        try:
            os.remove(sidecar_path(path))
        except FileNotFoundError:
            pass
        _VERIFIED.pop(path, None)
    return Pruned(doomed, sorted(damaged + others))


def step_in_name(path: str) -> Optional[int]:
    """The step a checkpoint file's name promises (`checkpoints/0000050.pt` -> 50), or None for a
    file outside a `checkpoints/` folder or named otherwise."""
    m = CHECKPOINT_NAME.match(os.path.basename(path))
    in_folder = os.path.basename(os.path.dirname(os.path.abspath(path))) == "checkpoints"
    return int(m.group(1)) if m and in_folder else None


def check_steps(state: dict, path: str, expected: Optional[int]) -> int:
    """`state["steps"]` as an int; ValueError unless it is a non-negative integer (equal to
    `expected` when given): a checkpoint resumed at a wrong step would overwrite good ones."""
    steps = state["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{path} holds steps={steps!r}, not a non-negative integer step count")
    if expected is not None and steps != expected:
        raise ValueError(f"{path} holds steps={steps}, but its name says step {expected}")
    return steps


def load_checkpoint(path: str, expected_step: Optional[int] = None) -> dict:
    """Load, verify (against its `.sha256` sidecar, when it has one) and sanity-check one
    checkpoint on CPU. Raises ValueError if it is damaged, unreadable or not complete, or if
    its `steps` is not a non-negative integer equal to `expected_step` (default: the step in
    the file name, for a file in a `checkpoints/` folder; see `step_in_name`)."""
    from models.checkpoints import read_checkpoint

    try:
        # mmap: every process of a large run reads the file without holding a private copy
        state = read_checkpoint(path)
    except (OSError, ValueError) as e:
        raise ValueError(str(e) if isinstance(e, ValueError) else f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise ValueError(f"{path} is not a training checkpoint (needs keys {list(REQUIRED_KEYS)})")
    check_steps(state, path, step_in_name(path) if expected_step is None else expected_step)
    for key in RECORD_KEYS:  # plain data, bounded: compared, logged and stored again by the resumed run
        if state.get(key) is not None:
            check_record(state[key], f"{path}: its {key}")
    return state


@dataclass
class ResumeChoice:
    """What `select_resume_checkpoint` found: the newest usable checkpoint (`path`, `state`;
    both None when none is usable) and every newer file it rejected, as (path, reason)."""

    path: Optional[str] = None
    state: Optional[dict] = None
    rejected: list = field(default_factory=list)

    @property
    def starts_fresh(self) -> bool:
        return self.state is None

    def messages(self) -> list[str]:
        """Lines for the run log: one warning per rejected file, and a loud one when files
        existed but none was usable (training restarts from step 0)."""
        lines = [f"WARNING: skipping corrupt checkpoint {p}: {reason}" for p, reason in self.rejected]
        if self.state is None and self.rejected:
            lines.append(f"WARNING: none of the {len(self.rejected)} checkpoint(s) is usable: STARTING FROM STEP 0. "
                         "Stop now (Ctrl-C) if you did not mean to restart; the damaged files are kept.")
        return lines


def select_resume_checkpoint(exp_dir: str, check=None) -> ResumeChoice:
    """Newest checkpoint of `exp_dir` that loads completely, matches its checksum and passes
    `check(state)` (the caller's test of its contents, e.g. `training.resume_check`: a ValueError
    rejects the file like a bad checksum); older ones are tried in turn. Nothing is deleted."""
    choice = ResumeChoice()
    for step, path in reversed(list_checkpoints(exp_dir)):
        try:
            state = load_checkpoint(path, expected_step=step)
            if check is not None:
                check(state)
            choice.path, choice.state = path, state
            return choice
        except ValueError as e:
            choice.rejected.append((path, str(e)))
    choice.path = None
    return choice


def find_resume_checkpoint(exp_dir: str) -> tuple[Optional[str], Optional[dict]]:
    """`select_resume_checkpoint` as (path, state), or (None, None) when there is none; each
    rejected file (and a final "starting from step 0") is reported with `warnings.warn`."""
    choice = select_resume_checkpoint(exp_dir)
    for line in choice.messages():
        warnings.warn(line.removeprefix("WARNING: "), stacklevel=2)
    return choice.path, choice.state

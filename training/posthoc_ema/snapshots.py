"""The snapshots of a run folder (`<run>/posthoc_ema/`): writing, thinning, and choosing the ones a
reconstruction may use.

A snapshot belongs to the run whose identity its header names (made when the run starts, kept in
the checkpoint across resumes). A run resumed from a checkpoint of an earlier version, whose
snapshots carry no identity, adopts those up to its resume step (``legacy_upto``). Nothing here
deletes or reads anything else: other runs' snapshots, damaged files and look-alikes (folders,
fifos, links under a snapshot's name) are left alone.

Thinning (``keep`` > 0) bounds the disk a long run needs. Once the run is at step T, the snapshot
of step s (on the ``every`` grid, s < T) stays when s is a multiple of ``every * 2^k`` with
``k = min(floor(log2(1 + (T - s) / (TAIL * every))), floor(log2(T / (keep * every))))``: the
spacing doubles with the snapshot's age (TAIL snapshots per spacing, so the newest ones stay
``every`` apart: small stds need them) but is never wider than T/keep (large stds need the whole
run evenly covered). A snapshot dropped at step T is dropped for every later step too, so a
killed and resumed run ends with the same snapshots as an uninterrupted one.
"""
from __future__ import annotations

import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from training.posthoc_ema.snapshot_file import KIND, NAME, Snapshot, SnapshotError, read_header, step_of

FOLDER = "posthoc_ema"
TAIL = 2
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def snapshot_folder(exp_dir: str) -> str:
    return os.path.join(exp_dir, FOLDER)


def snapshot_path(exp_dir: str, step: int) -> str:
    return os.path.join(snapshot_folder(exp_dir), f"{step:07d}.safetensors")


def new_run_identity() -> str:
    """`20261207T090246123456Z-1a2b3c4d`: the UTC start time to the microsecond (identities sort by
    start, also for two runs started in the same second) and 32 random bits."""
    now = time.time()
    return (time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z-"
            + secrets.token_hex(4))


def keeps(step: int, now: int, every: int, keep: int) -> bool:
    """Whether thinning keeps the snapshot of `step` once the run has written the one of `now` (see the
    module docstring). Snapshots off the `every` grid (a final step, an earlier `every`) and the newest
    are always kept; keep = 0 keeps everything."""
    if keep <= 0 or step >= now or step % every:
        return True
    tail = TAIL * every
    k_age = ((tail + now - step) // tail).bit_length() - 1
    k_run = (now // (keep * every)).bit_length() - 1 if now >= keep * every else 0
    return (step // every) % (1 << min(k_age, k_run)) == 0


def kept_steps(now: int, every: int, keep: int) -> List[int]:
    """The snapshot steps a run that wrote one every `every` steps (and at `now`) holds at step `now`."""
    steps = [s for s in range(every, now + 1, every) if keeps(s, now, every, keep)]
    return steps + ([now] if now % every else [])


@dataclass
class Listing:
    """What a snapshot folder holds, oldest first: readable snapshots, damaged ones (path, reason) and
    look-alikes (paths under a snapshot's name that are not regular files; never opened)."""
    snapshots: List[Snapshot] = field(default_factory=list)
    damaged: List[tuple] = field(default_factory=list)
    others: List[str] = field(default_factory=list)


def list_folder(folder: str) -> Listing:
    listing = Listing()
    try:
        names = [name for name in os.listdir(folder) if NAME.match(name)]
    except (FileNotFoundError, NotADirectoryError):
        return listing
    except OSError as e:
        raise SnapshotError(f"cannot list the post-hoc EMA snapshots in {folder}: {e.strerror or e}") from None
    for name in sorted(names, key=step_of):
        path = os.path.join(folder, name)
        try:
            regular = stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            continue
        if not regular:
            listing.others.append(path)
            continue
        try:
            listing.snapshots.append(read_header(path))
        except SnapshotError as e:
            listing.damaged.append((path, str(e)))
    return listing


def belongs(snapshot: Snapshot, run: str, legacy_upto: Optional[int]) -> bool:
    """Whether `snapshot` is one of run `run`'s (its own, or one without identity that it adopted)."""
    if snapshot.run:
        return snapshot.run == run
    return bool(run) and legacy_upto is not None and snapshot.step <= legacy_upto


def _span(steps: Sequence[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]} to {steps[-1]}"


# ------------------------------------------------------------------ the training side
class SnapshotStore:
    """Rank 0's writer of a run's snapshots: `start()` once, `write(...)` every `every` steps."""

    def __init__(self, exp_dir: str, run: str, legacy_upto: Optional[int], every: int, keep: int, dtype: str):
        self.folder = snapshot_folder(exp_dir)
        self.exp_dir, self.run, self.legacy_upto = exp_dir, run, legacy_upto
        self.every, self.keep, self.dtype = every, keep, STORE_DTYPES[dtype]

    def start(self) -> Optional[str]:
        """Remove the temporaries of interrupted snapshot writes (as for checkpoints); a warning line when
        the folder holds snapshots that are not this run's."""
        from training.checkpoint import remove_temporaries

        remove_temporaries(self.folder)
        try:
            listing = list_folder(self.folder)
        except SnapshotError as e:
            return f"WARNING: {e}"
        foreign = [s.step for s in listing.snapshots if not belongs(s, self.run, self.legacy_upto)]
        odd = [p for p, _ in listing.damaged] + listing.others
        if not foreign and not odd:
            return None
        what = [f"{len(foreign)} post-hoc EMA snapshot(s) of other runs ({_span(foreign)})"] if foreign else []
        what += [f"{len(odd)} damaged or non-regular file(s) under snapshot names"] if odd else []
        return (f"WARNING: {self.folder} holds {' and '.join(what)}: never read as this run's (run {self.run}) and "
                "left alone, except that this run's snapshots replace those at the same steps")

    def write(self, step: int, profiles: Sequence[dict], stds: Sequence[float], t: int, arch: dict,
              config: dict) -> str:
        """Write the snapshot of `step` (every profile's state dict, floating tensors in the store's
        dtype; a tensor beyond float16's range stays float32), then thin the older ones."""
        from models.weights_io import export_weights

        groups = {f"p{i}": {k: _stored(v, self.dtype) for k, v in state.items()} for i, state in enumerate(profiles)}
        info = {"kind": KIND, "run": self.run, "stds": list(stds), "t": int(t),
                **({"legacy_upto": self.legacy_upto} if self.legacy_upto is not None else {})}
        path = snapshot_path(self.exp_dir, step)
        export_weights(path, groups, arch=arch, config=config, steps=step, weights_info=info)
        self.thin(step)
        return path

    def thin(self, now: int) -> List[str]:
        """Delete this run's snapshots that the thinning rule drops at step `now` (only files whose
        header checks out as this run's, complete; never the newest). Returns their paths."""
        removed = []
        for snap in list_folder(self.folder).snapshots:
            if snap.run == self.run and not keeps(snap.step, now, self.every, self.keep):
                try:
                    os.remove(snap.path)
                    removed.append(snap.path)
                except OSError:  # kept: the next thinning tries again
                    pass
        return removed


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A CPU copy for a snapshot: floating tensors in `dtype` (cast on their device, one at a time, so
    only half the bytes cross to the host), except one with values beyond what `dtype` holds."""
    tensor = tensor.detach()
    if tensor.is_floating_point() and tensor.dtype != dtype:
        if tensor.numel() == 0 or not float(tensor.abs().amax()) > torch.finfo(dtype).max:
            tensor = tensor.to(dtype)
    return tensor.cpu()


# ------------------------------------------------------------------ the reconstruction side
@dataclass
class Selection:
    """The snapshots one reconstruction uses (oldest first; the last is the target) and lines worth
    printing about what was left out."""
    used: List[Snapshot]
    notes: List[str]

    @property
    def target(self) -> Snapshot:
        return self.used[-1]


def select_snapshots(run_dir: str, run: Optional[str] = None, step: Optional[int] = None) -> Selection:
    """The snapshots of one run up to `step` (default: its newest), checked against each other: the same
    arch, stds and tensors (exact shapes), steps and t strictly increasing. `run` defaults to the run
    started last. SnapshotError (one line) when there is none, one is damaged, or they disagree."""
    folder = snapshot_folder(run_dir)
    listing = list_folder(folder)
    if listing.damaged:
        raise SnapshotError(listing.damaged[0][1])
    if not listing.snapshots:
        raise SnapshotError(f"{run_dir} holds no post-hoc EMA snapshots ({folder}/<step>.safetensors): train "
                            "with posthoc_ema.stds (e.g. [0.05, 0.10]) to keep them")
    runs = sorted({s.run for s in listing.snapshots})
    chosen = runs[-1] if run is None else run
    own = [s for s in listing.snapshots if s.run == chosen]
    if not own:
        raise SnapshotError(f"{folder} holds no snapshots of run {chosen!r}; its runs: "
                            + ", ".join(r or "(without identity)" for r in runs))
    members = [s for s in listing.snapshots if belongs(s, chosen, own[-1].legacy_upto) or s.run == chosen]
    if step is not None and step not in {s.step for s in members}:
        steps = [str(s.step) for s in members]
        shown = ", ".join(steps if len(steps) <= 12 else steps[:5] + ["..."] + steps[-5:])
        raise SnapshotError(f"{run_dir} has no post-hoc EMA snapshot at step {step} (run {chosen or 'without identity'}"
                            f"; snapshots at {shown})")
    used = [s for s in members if step is None or s.step <= step]
    _check_consistent(used)
    notes = []
    left_out = [s for s in listing.snapshots if s not in members]
    if left_out:
        others = sorted({s.run or "(without identity)" for s in left_out})
        notes.append(f"left out {len(left_out)} snapshot(s) of other runs in {folder} ({', '.join(others[:4])}; "
                     "--run chooses the run)")
    if listing.others:
        notes.append(f"left alone (not regular files): {', '.join(os.path.basename(p) for p in listing.others[:6])}")
    return Selection(used, notes)


def _check_consistent(used: List[Snapshot]) -> None:
    target = used[-1]
    layout = target.layout()
    for before, snap in zip([None] + used[:-1], used):
        why = None
        if snap.arch != target.arch:
            why = "another arch"
        elif snap.stds != target.stds:
            why = f"profiles {snap.stds}, not {target.stds}"
        elif snap.layout() != layout:
            names = set(snap.layout()) ^ set(layout)
            diff = next(iter(sorted(names)), None) or next(n for n in layout if snap.layout()[n] != layout[n])
            why = f"other tensors than step {target.step}'s (first difference: {diff[:80]})"
        elif before is not None and snap.t <= before.t:
            why = f"t={snap.t}, not above step {before.step}'s t={before.t}"
        if why:
            raise SnapshotError(f"post-hoc EMA snapshot {snap.path} does not fit the run's others ({why}); it was "
                                "edited or comes from another run: move it away")

"""Corrupt training samples: one error that names the file, and the `bad_samples: error | skip` policy.

The readers (per_image.py, packed.py) raise :class:`CorruptSampleError` (index, path, reason) for
an undecodable or truncated file, a wrong-size image, a wrong-shape or wrong-dtype latent,
non-finite values, a missing file or a label out of range.

:class:`ReplaceBadSamples` wraps a dataset for the DataLoader: item ``i`` becomes ``(x, y, bad)``
with ``bad = -1`` normally; when sample ``i`` is corrupt it returns the first good sample of a
fixed pseudo-random probe sequence of ``i`` (:func:`replacement_index`, a pure function of ``i``,
so the data stays identical whatever the worker count and a resumed run sees the same data) and
``bad = i``. Counts cannot live in worker processes, so the main process reads the collated
``bad`` column: :class:`BadSampleTracker` raises a one-line error (policy ``error``) or records,
counts and writes the bad files to ``bad_samples.json`` (policy ``skip``).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import torch

from .storage import atomic_write_json

POLICIES = ("error", "skip")
MAX_PROBES = 64


class CorruptSampleError(ValueError):
    """Sample `index` (file `path`) cannot be used: `reason`."""

    def __init__(self, index, path: Optional[str] = None, reason: Optional[str] = None):
        if path is None and reason is None and isinstance(index, str):
            # re-created from its message alone (torch re-raises DataLoader worker errors this way)
            super().__init__(index)
            self.index, self.path, self.reason = None, None, index
            return
        self.index, self.path, self.reason = index, path, reason
        super().__init__(f"corrupt sample {index}: {path}: {reason}")

    def __reduce__(self):
        if self.path is None:
            return type(self), (self.reason,)
        return type(self), (self.index, self.path, self.reason)


def checked_label(dataset, i: int, source: str) -> int:
    """`dataset.labels[i]`, or CorruptSampleError when it is outside 0..num_classes-1 (`source`:
    where the labels come from, for the message)."""
    label = int(dataset.labels[i])
    if not 0 <= label < dataset.num_classes:
        raise CorruptSampleError(i, dataset.sample_path(i), f"label {label} is outside 0..{dataset.num_classes - 1} "
                                 f"({source})")
    return label


def replacement_index(index: int, attempt: int, n: int) -> int:
    """The `attempt`-th (1, 2, ...) stand-in for sample `index` among `n`: a splitmix64 hash of
    (index, attempt), so a run of consecutive bad files (a truncated shard) is left at once."""
    z = (index * 0x9E3779B97F4A7C15 + attempt * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) % n


class ReplaceBadSamples(torch.utils.data.Dataset):
    """``dataset[i] -> (x, y)`` becomes ``(x, y, bad)`` (any tuple gains ``bad`` last): ``bad = -1``, or ``i`` when sample `i`
    was corrupt and replaced by a good one (see the module docstring). Other attributes
    (``kind``, ``item_shape``, ``num_classes``, ...) are those of the wrapped dataset."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i: int):
        try:
            return (*self.dataset[i], -1)
        except CorruptSampleError as error:
            first = error
        n = len(self.dataset)
        for attempt in range(1, MAX_PROBES + 1):
            try:
                return (*self.dataset[replacement_index(i, attempt, n)], i)
            except CorruptSampleError:
                continue
        raise CorruptSampleError(i, first.path, f"{first.reason}; and {MAX_PROBES} stand-ins for it are corrupt "
                                 "too: most of the dataset is damaged (run `python dataset_tools.py verify`)")


class BadSampleTracker:
    """Main-process side of the policy. Call :meth:`observe` with each batch's ``bad`` column.

    ``error``: the first bad sample raises CorruptSampleError (re-read here, so the message is one
    line naming the file and the problem, not a worker traceback). ``skip``: each bad file is
    recorded once (index, path, reason, first step), every replacement is counted.
    ``existing``: a ``bad_samples.json`` of an earlier launch of the run, whose files are kept.
    ``defer_errors`` (multi-process runs, where one rank raising alone leaves the others hanging in
    a collective): ``error`` keeps the first error in ``.pending`` instead of raising; the loop
    checks ``pending`` on every rank at its next synchronisation point and stops them all.
    """

    def __init__(self, dataset, policy: str = "error", existing: Optional[str] = None, defer_errors: bool = False):
        if policy not in POLICIES:
            raise ValueError(f"bad_samples must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.dataset = dataset.dataset if isinstance(dataset, ReplaceBadSamples) else dataset
        self.policy = policy
        self.defer_errors = defer_errors
        self.pending: Optional[CorruptSampleError] = None
        self.replacements = 0
        self.records: dict[int, dict] = {}
        if existing and os.path.isfile(existing):
            with open(existing) as f:
                self.merge(json.load(f).get("files", []))

    @property
    def count(self) -> int:
        """Distinct bad files seen so far."""
        return len(self.records)

    def observe(self, bad, step: Optional[int] = None) -> list[dict]:
        """`bad`: the collated flags (tensor or ints; -1 = fine). Returns the records of files
        seen for the first time. Cheap when nothing is bad (one comparison on a CPU tensor)."""
        flags = torch.as_tensor(bad)
        hit = flags >= 0
        if not bool(hit.any()):
            return []
        indices = flags[hit].tolist()
        if self.policy == "error":
            if not self.defer_errors:
                raise self.error_for(indices[0])
            self.pending = self.pending or self.error_for(indices[0])
            return []
        self.replacements += len(indices)
        new = []
        for index in indices:
            if index not in self.records:
                error = self.error_for(index)
                self.records[index] = {"index": index, "file": error.path, "reason": error.reason, "first_step": step}
                new.append(self.records[index])
        return new

    def error_for(self, index: int) -> CorruptSampleError:
        """The error sample `index` raises (read again in this process)."""
        try:
            self.dataset[index]
        except CorruptSampleError as error:
            return CorruptSampleError(
                error.index, error.path,
                f"{error.reason} (bad_samples=skip trains around corrupt files; "
                "`python dataset_tools.py verify DATA_DIR` lists them all)" if self.policy == "error" else error.reason)
        return CorruptSampleError(index, "?", "reported corrupt by a DataLoader worker, but reads fine here")

    def merge(self, records: Iterable[dict]) -> None:
        """Add records from another process (DDP ranks) or an earlier launch."""
        for record in records:
            self.records.setdefault(int(record["index"]), dict(record))

    def summary(self) -> dict:
        files = [self.records[i] for i in sorted(self.records)]
        return {"policy": self.policy, "num_files": len(files), "replacements": self.replacements, "files": files}

    def write(self, path: str) -> None:
        """Write :meth:`summary` to `path` (atomically), e.g. ``<exp_dir>/bad_samples.json``."""
        atomic_write_json(path, self.summary())

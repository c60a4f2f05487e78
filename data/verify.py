"""`dataset_tools.py verify DIR`: read every item of a dataset, in parallel, and list the bad ones.

Any dataset `open_dataset` reads (images or latents; per-image folder or ZIP; packed). Each
item goes through the reader's own checks (decodable, dtype, finite, label in range: see
data/robust.py), and its shape is compared with the most common shape. Packed datasets also
get their `files.json` checked against `index.json`.

Nothing is written into the dataset (it may be read-only or shared): the summary and the first
problems are printed, and the full report goes where `report` says (`--report FILE`; `-` prints
it as JSON). It has the layout of convert's `conversion_report.json` (a list of {"file", "reason"})::

    {"status": "complete", "source": ..., "kind": "images", "format": "per-image",
     "num_items": N, "item_shape": [3, 256, 256], "num_classes": K, "classes": [...],
     "empty_classes": [...], "num_problems": P, "problems": [{"file", "reason", "index"}, ...]}
"""
from __future__ import annotations

import collections
import json
import multiprocessing
import os
import time

from .convert import shown
from .datasets import open_dataset
from .packed import PackedLatentDataset
from .robust import CorruptSampleError
from .storage import atomic_write_json, destination_writes

_DATASET = None  # opened once in each worker process


def _init_worker(path: str) -> None:
    global _DATASET
    _DATASET = open_dataset(path)


def _check_range(bounds: tuple[int, int]):
    """(bounds, {shape: [indices]}, [(index, path, reason)]) for items `start..stop-1`."""
    shapes: dict[tuple, list[int]] = collections.defaultdict(list)
    problems = []
    for i in range(*bounds):
        try:
            x, _label = _DATASET.load_item(i)
        except CorruptSampleError as e:
            problems.append((i, e.path, e.reason))
            continue
        shapes[tuple(x.shape)].append(i)
    return bounds, dict(shapes), problems


def _relative(dataset_path: str, path: str) -> str:
    prefix = dataset_path.rstrip("/\\") + os.sep
    return path[len(prefix):] if path.startswith(prefix) else path


def _packed_extras(dataset: PackedLatentDataset) -> list[dict]:
    name = dataset.index.get("files")
    if not name:
        return []
    try:
        with open(os.path.join(dataset.path, name)) as f:
            files = json.load(f)
    except (OSError, ValueError) as e:
        return [{"file": name, "reason": f"cannot read it: {e}", "index": None}]
    if len(files) != len(dataset):
        return [{"file": name, "reason": f"lists {len(files)} source files for {len(dataset)} items", "index": None}]
    return []


def verify_dataset(path: str, workers: int | None = None, report: str | None = None, progress: bool = True) -> dict:
    """Check every item of the dataset at `path`; write the report to the file `report` when given
    (never into the dataset otherwise); return a summary dict with `num_items`, `num_problems`,
    `problems`, `item_shape`, `seconds`, `report` (the path written, or None) and `report_data`
    (what the report file holds)."""
    start = time.time()
    dataset = open_dataset(path)  # layout errors (no dataset.json, ...) raise ValueError here
    n = len(dataset)
    workers = max(1, min(workers or (os.cpu_count() or 1), n))
    chunk = max(1, min(1024, -(-n // (workers * 8))))
    ranges = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]

    from tqdm import tqdm

    bar = tqdm(total=n, unit="item", desc="verify", disable=not progress, dynamic_ncols=True)
    shapes: dict[tuple, list[int]] = collections.defaultdict(list)
    found = []
    pool = None
    try:
        if workers == 1:
            _init_worker(dataset.path)
            results = map(_check_range, ranges)
        else:
            pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(dataset.path,))
            results = pool.imap_unordered(_check_range, ranges)
        for (a, b), part_shapes, part_problems in results:
            for shape, indices in part_shapes.items():
                shapes[shape].extend(indices)
            found.extend(part_problems)
            bar.update(b - a)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()

    common = max(shapes, key=lambda s: len(shapes[s])) if shapes else None
    for shape, indices in shapes.items():
        if shape != common:
            for i in indices:
                found.append((i, dataset.sample_path(i),
                              f"shape {shape} differs from the dataset's {common} ({len(shapes[common])} items)"))
    found.sort()
    problems = [{"file": _relative(dataset.path, p), "reason": r, "index": i} for i, p, r in found]
    if isinstance(dataset, PackedLatentDataset):
        problems += _packed_extras(dataset)

    classes = list(dataset.classes) if dataset.classes else None
    present = collections.Counter(int(v) for v in dataset.labels)
    empty = [c for k, c in enumerate(classes) if not present[k]] if classes else []
    report_data = {
        "status": "complete",
        "source": os.path.abspath(path),
        "kind": dataset.kind,
        "format": "packed" if isinstance(dataset, PackedLatentDataset) else "per-image",
        "num_items": n,
        "item_shape": list(common) if common else None,
        "num_classes": int(dataset.num_classes),
        "classes": classes,
        "empty_classes": empty,
        "num_problems": len(problems),
        "problems": problems,
    }
    if report:
        with destination_writes(report, "--report"):
            atomic_write_json(report, report_data)
    return {"num_items": n, "num_problems": len(problems), "problems": problems, "item_shape": common,
            "kind": dataset.kind, "seconds": time.time() - start, "workers": workers, "report": report or None,
            "report_data": report_data}


def format_summary(summary: dict, listed: int = 10) -> str:
    """The counts and time, then one line per problem (the first `listed`; names that hold a newline
    are escaped, so each problem stays one line), and where the full report is."""
    shape = "x".join(map(str, summary["item_shape"])) if summary["item_shape"] else "none readable"
    lines = [f"verify: {summary['num_items']} {summary['kind']} items ({shape}) checked in {summary['seconds']:.1f} s "
             f"with {summary['workers']} worker(s): {summary['num_problems']} problem(s)"]
    for problem in summary["problems"][:listed]:
        lines.append(f"  {shown(problem['file'])}: {shown(problem['reason'])}")
    more = summary["num_problems"] - listed
    if summary["report"]:
        lines.append(f"  full report: {shown(summary['report'])}")
    elif more > 0:
        lines.append(f"  ... {more} more (--report FILE writes them all as JSON)")
    return "\n".join(lines)

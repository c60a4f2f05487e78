"""`dataset_tools.py convert`: raw class-folder images -> fixed-resolution PNG dataset (SPEC section 7).

Output (a folder, or a ZIP holding the same files):

    00000/img00000000.png ... {idx//1000:05d}/img{idx:08d}.png
    dataset.json            {"labels": [[relpath, label], ...], "classes": [folder names]}
    conversion_report.json  settings, counts, every skipped file with its reason, empty classes,
                            folder links not followed (loops, repeats) with the reason

`idx` is the position of the file among all image-extension candidates (sorted class folders,
then sorted paths); a file that cannot be converted leaves its `idx` unused, so every other
image keeps the same name across reruns. dataset.json lists only the images written.

Resuming: each PNG is written atomically, so an existing output is complete and is not redone;
files that failed are retried (and fail again) on every run; dataset.json and the report are
written at the end. A ZIP destination is built in `DEST.partial/` (resumable the same way) and
zipped at the end.

A write that fails on the destination (disk full, quota, read-only, no permission) stops the run
with one DestinationWriteError naming the file (data/storage.py); it is not a bad source file.
A resolution whose image buffers would not fit in memory is refused before any work
(`_workers_that_fit`). Pool workers die with the convert process, even under kill -9.
"""

from __future__ import annotations

import ctypes
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .sources import RawSource
from .storage import atomic_write_bytes, atomic_write_json, destination_writes, zip_folder
from .transforms import TRANSFORMS, apply_transform

REPORT_NAME = "conversion_report.json"
# Memory a worker needs per output pixel: four buffers of the output's size at PIL's 4 bytes a pixel
# (RGB is stored as RGBX) live at once: the resize's intermediate pass, the resized image, the crop,
# and the PNG being encoded with its bytes copy.
BYTES_PER_OUTPUT_PIXEL = 16
# Share of the available memory (MemAvailable) all workers together may plan to use: the decoded
# source images, the pool and the rest of the machine need the other half.
MEMORY_FRACTION = 0.5
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def image_relpath(idx: int) -> str:
    return f"{idx // 1000:05d}/img{idx:08d}.png"


@dataclass(frozen=True)
class _Job:
    source: RawSource
    out_dir: str
    size: tuple[int, int]
    transform: str
    compress_level: int


_JOB: _Job | None = None  # set in each worker process by _init_worker
_PARENT: int | None = None  # the convert process, in pool workers


def _init_worker(job: _Job, parent: int | None = None) -> None:
    global _JOB, _PARENT
    _JOB, _PARENT = job, parent
    warnings.simplefilter("ignore")  # PIL warns on odd metadata; failures are reported instead
    if parent is not None:
        _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """A worker must not go on writing after the convert process was killed (kill -9 runs no
    cleanup): Linux sends it SIGKILL when the parent exits (prctl PR_SET_PDEATHSIG; its writes are
    atomic, a rerun removes the temporary file); elsewhere `_worker_task` checks between images."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def convert_one(job: _Job, idx: int, relpath: str) -> str | None:
    """Convert one source file into its output PNG. Returns None on success, else the reason the
    source file is skipped. A failed write raises DestinationWriteError: it stops the run."""
    try:
        data = job.source.read(relpath)
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes everything now: truncated files fail here, not later
            out = apply_transform(img, job.transform, job.size)
        buf = io.BytesIO()
        out.save(buf, format="png", compress_level=job.compress_level)
    except UnidentifiedImageError:
        return "not a readable image: PIL cannot identify the file format"
    except Exception as exc:  # one bad file must never stop the run
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    path = os.path.join(job.out_dir, image_relpath(idx))
    with destination_writes(path):
        atomic_write_bytes(path, buf.getvalue())
    return None


def _worker_task(task: tuple[int, str]) -> tuple[int, str | None]:
    if _PARENT is not None and os.getppid() != _PARENT:
        os._exit(1)  # the convert process is gone (no prctl here): stop writing
    idx, relpath = task
    return idx, convert_one(_JOB, idx, relpath)


def _scan_existing(out_dir: str) -> set[int]:
    """Indices whose PNG exists in `out_dir`; deletes temp files left by an interrupted run."""
    done = set()
    if not os.path.isdir(out_dir):
        return done
    with os.scandir(out_dir) as top:
        subdirs = [e.path for e in top if e.is_dir() and e.name.isdigit()]
    for sub in subdirs:
        with os.scandir(sub) as it:
            for entry in it:
                name = entry.name
                if name.startswith(".tmp-"):
                    os.remove(entry.path)
                elif name.startswith("img") and name.endswith(".png") and name[3:-4].isdigit():
                    done.add(int(name[3:-4]))
    return done


def _settings(listing, num_candidates: int, size, transform: str, max_images, compress_level: int) -> dict:
    # The source path is not part of the identity (a moved source may resume); its content is.
    return {
        "resolution": f"{size[0]}x{size[1]}",
        "transform": transform,
        "max_images": max_images,
        "png_compress_level": compress_level,
        "num_classes": len(listing.classes),
        "num_candidates": num_candidates,
    }


def _check_resume(out_dir: str, settings: dict) -> None:
    path = os.path.join(out_dir, REPORT_NAME)
    if not os.path.exists(path):
        return
    with open(path) as f:
        previous = json.load(f).get("settings", {})
    if previous != settings:
        raise ValueError(
            f"{out_dir!r} holds a conversion made with other settings or another source:\n"
            f"  there: {previous}\n  now:   {settings}\n"
            "Use a new --dest, or delete the old one to start over."
        )


def convert_dataset(
    source: str,
    dest: str,
    resolution: tuple[int, int] = (256, 256),
    transform: str = "center-crop-dhariwal",
    max_images: int | None = None,
    workers: int | None = None,
    compress_level: int = 1,
    progress: bool = True,
) -> dict:
    """Convert `source` (folder or ZIP of class folders) into `dest` (folder or `.zip`).

    Returns a summary dict: `written`, `already_done`, `skipped` (list of (file, reason)),
    `empty_classes`, `num_images`, `num_classes`, `seconds`, `images_per_s`, `report`.
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown --transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    if max_images is not None and max_images < 0:
        raise ValueError(f"--max-images must be >= 0, got {max_images}")
    size = (int(resolution[0]), int(resolution[1]))
    fitting_workers = _workers_that_fit(size, workers)
    dest = os.fspath(dest)
    to_zip = dest.lower().endswith(".zip")
    out_dir = dest + ".partial" if to_zip else dest
    # Resolved paths: a link must not put the output inside the source (the next conversion would
    # take it in as a class) nor the source inside the output.
    src_real = os.path.realpath(source)
    for out in (dest, out_dir):
        out_real = os.path.realpath(out)
        if os.path.commonpath([src_real, out_real]) in (src_real, out_real):
            raise ValueError(f"--dest {dest!r} must lie outside --source {source!r} (and not contain it), also "
                             f"through links: {out!r} resolves to {out_real!r}, the source to {src_real!r}")

    start = time.time()
    src = RawSource(source, exclude=(dest, out_dir))
    listing = src.list()
    candidates = listing.items if max_images is None else listing.items[:max_images]
    settings = _settings(listing, len(candidates), size, transform, max_images, compress_level)
    if to_zip and os.path.isfile(dest) and not os.path.isdir(out_dir):
        return _finished_zip_summary(dest, settings, start)
    _check_resume(out_dir, settings)
    report_path = os.path.join(out_dir, REPORT_NAME)
    with destination_writes(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    with destination_writes(report_path):
        atomic_write_json(report_path, {"status": "incomplete", "settings": settings})

    with destination_writes(out_dir):  # removing the temporary files of an interrupted run
        done = _scan_existing(out_dir)
    tasks = [(idx, rel) for idx, (rel, _label) in enumerate(candidates) if idx not in done]
    job = _Job(src, out_dir, size, transform, compress_level)
    workers = max(1, min(fitting_workers or _cpu_count(), len(tasks) or 1))
    failures: dict[int, str] = {}

    bar = _progress_bar(len(candidates), len(candidates) - len(tasks), progress)
    try:
        if workers == 1:
            _init_worker(job)
            results = map(_worker_task, tasks)
            _collect(results, failures, bar)
        else:
            with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(job, os.getpid())) as pool:
                chunk = max(1, min(64, len(tasks) // (workers * 16)))
                _collect(pool.imap_unordered(_worker_task, tasks, chunksize=chunk), failures, bar)
    finally:
        bar.close()
    seconds = time.time() - start

    written_idx = sorted(_scan_existing(out_dir) & set(range(len(candidates))))
    labels = [[image_relpath(idx), candidates[idx][1]] for idx in written_idx]
    skipped = listing.skipped + [(candidates[idx][0], reason) for idx, reason in sorted(failures.items())]
    skipped.sort()
    meta = {"labels": labels, "classes": listing.classes}
    meta_path = os.path.join(out_dir, "dataset.json")
    with destination_writes(meta_path):
        atomic_write_json(meta_path, meta, indent=None)
    report = {
        "status": "complete",
        "settings": settings,
        "source": os.path.abspath(source),
        "classes": listing.classes,
        "num_images": len(labels),
        "num_skipped": len(skipped),
        "skipped": [{"file": f, "reason": r} for f, r in skipped],
        "empty_classes": listing.empty_classes,
        "skipped_links": [{"link": link, "reason": r} for link, r in listing.skipped_links],
    }
    with destination_writes(report_path):
        atomic_write_json(report_path, report)
    if to_zip:
        with destination_writes(dest):
            zip_folder(out_dir, dest, skip=())
        report_path = dest + "." + REPORT_NAME
        with destination_writes(report_path):
            atomic_write_json(report_path, report)
        shutil.rmtree(out_dir)

    return {
        "written": len(tasks) - len(failures),
        "already_done": len(candidates) - len(tasks),
        "skipped": skipped,
        "empty_classes": listing.empty_classes,
        "skipped_links": listing.skipped_links,
        "num_images": len(labels),
        "num_classes": len(listing.classes),
        "seconds": seconds,
        "images_per_s": (len(tasks) - len(failures)) / max(seconds, 1e-9),
        "workers": workers,
        "report": report_path,
        "dest": dest,
    }


def _available_memory() -> int | None:
    """Bytes of memory available to new work: MemAvailable (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _workers_that_fit(size: tuple[int, int], workers: int | None) -> int | None:
    """The worker count to use (None: one per core) once the image buffers of `size` are checked
    against MEMORY_FRACTION of the available memory: the default count is lowered to what fits; a
    size that does not fit one worker, or an explicit --workers that does not fit, is refused."""
    available = _available_memory()
    if not available:
        return workers
    per_worker = BYTES_PER_OUTPUT_PIXEL * size[0] * size[1]
    budget = int(available * MEMORY_FRACTION)
    fit = budget // per_worker
    wanted = workers or _cpu_count()
    if fit >= wanted:
        return workers
    if fit >= 1 and workers is None:
        return fit
    what = (f"--resolution {size[0]}x{size[1]} needs about {_gib(per_worker)} of image buffers per worker process "
            f"({BYTES_PER_OUTPUT_PIXEL} bytes per output pixel)")
    if fit < 1:
        raise ValueError(f"{what}, more than half of the {_gib(available)} of memory available; "
                         "choose a smaller --resolution")
    raise ValueError(f"{what}, {_gib(per_worker * wanted)} for --workers {wanted}, more than half of the "
                     f"{_gib(available)} of memory available; use --workers {fit} or fewer, or a smaller --resolution")


def _finished_zip_summary(dest: str, settings: dict, start: float) -> dict:
    """A rerun on a complete ZIP: nothing to do once its settings match."""
    from .storage import ZipReader

    zf = ZipReader(dest)
    try:
        report = json.loads(zf.read(REPORT_NAME))
    except KeyError:
        raise FileExistsError(f"--dest {dest!r} exists but was not written by convert; delete it or pick another name")
    finally:
        zf.close()
    if report.get("settings") != settings:
        raise ValueError(
            f"{dest!r} holds a conversion made with other settings or another source:\n"
            f"  there: {report.get('settings')}\n  now:   {settings}\nUse a new --dest, or delete the old one."
        )
    skipped = [(s["file"], s["reason"]) for s in report["skipped"]]
    return {
        "written": 0, "already_done": report["num_images"], "skipped": skipped,
        "empty_classes": report["empty_classes"],
        "skipped_links": [(s["link"], s["reason"]) for s in report.get("skipped_links", [])],
        "num_images": report["num_images"],
        "num_classes": len(report["classes"]), "seconds": time.time() - start, "images_per_s": 0.0,
        "workers": 0, "report": dest + "." + REPORT_NAME, "dest": dest,
    }


def _collect(results, failures: dict, bar) -> None:
    for idx, reason in results:
        if reason is not None:
            failures[idx] = reason
        bar.update(1)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _progress_bar(total: int, initial: int, enabled: bool):
    from utils.progress import progress_bar

    return progress_bar(total=total, initial=initial, unit="img", desc="convert", disable=not enabled, dynamic_ncols=True)


def shown(name: str) -> str:
    """`name` as printed in a report line: escaped (repr) when it holds a newline or another
    unprintable character, so that every line of the summary stays one line."""
    return name if name.isprintable() else repr(name)


def format_summary(summary: dict) -> str:
    lines = [
        f"convert: {summary['written']} images written, {summary['already_done']} already present, "
        f"{len(summary['skipped'])} files skipped, {len(summary['empty_classes'])} empty class folders",
        f"  {summary['images_per_s']:.1f} images/s with {summary['workers']} worker(s), {summary['seconds']:.1f} s",
        f"  dataset: {summary['num_images']} images, {summary['num_classes']} classes -> {shown(summary['dest'])}",
    ]
    links = summary.get("skipped_links", [])
    if links:
        lines[0] += f", {len(links)} folder links not followed"
    if summary["skipped"] or summary["empty_classes"] or links:
        for link, reason in links[:10]:
            lines.append(f"  not followed: folder link {shown(link)}: {shown(reason)}")
        for f, reason in summary["skipped"][:10]:
            lines.append(f"  skipped {shown(f)}: {shown(reason)}")
        if len(summary["skipped"]) > 10:
            lines.append(f"  ... {len(summary['skipped']) - 10} more")
        for name in summary["empty_classes"][:10]:
            lines.append(f"  empty class folder {shown(name)} (keeps its label index)")
        lines.append(f"  full list: {shown(summary['report'])}")
    return "\n".join(lines)

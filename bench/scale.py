"""Cost as work grows: time and memory of the pieces whose cost could grow with the data or the samples.

    python -m bench.scale resume-check --images 1000 5000 20000        # generate.py's resume check
    python -m bench.scale per-image --items 50000 200000 1281167       # open a per-image dataset, workers
    python -m bench.scale train-memory [KEY=VALUE ...]                 # train.py's main process, phase by phase

`resume-check`: `generation.runner.find_missing` (what generate.py runs before sampling), and the
full decode on one thread that it replaced, over a folder of finished PNGs written by `generation.images.write_png_atomic`, on a warm page cache
(the files just written) and on a cold one (`posix_fadvise(POSIX_FADV_DONTNEED)` on every file
after `fsync`, no root needed).

`per-image`: a per-image latents dataset.json of N entries in the layout of `encode` (SPEC §7),
opened in a fresh process: its RSS after the imports, after `data.open_dataset` (peak and
retained) and the time; then 2 DataLoader workers draw `--batches` shuffled batches and their
private memory (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup: pages copied on write
from the parent) is read after the first batch and after the last. The files themselves are not
needed to measure this: the reader's file access (`_read`) returns one fixed latent (the item
bookkeeping, label check and decode run as usual).

`train-memory`: `train.py` on the CPU demo's config (experiments/train/demo_cpu.yaml; its dataset
written to a temporary folder) with `max_train_steps=1`, in this process: VmRSS and VmHWM after
each start-up phase of `training.loop` and after the step, the checkpoint and the preview, with
the Python heap (tracemalloc) beside them, then which large packages the run imported, who
imported each first, and the RSS each one added (measured again, alone, in a fresh process).

Numbers: docs/PERFORMANCE.md "Cost as work grows". Linux only (/proc). No timing is asserted by a test.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.table import Table  # noqa: E402


def _status_mib(pid: int | str = "self") -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _private_mib(pid: int) -> float:
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def _header() -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {platform.machine()} {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}, Python {platform.python_version()}", flush=True)


# ------------------------------------------------------------------ generate.py resume

def drop_from_page_cache(paths) -> None:
    """Make the files cold: fsync (their pages become clean), then POSIX_FADV_DONTNEED drops them
    from the page cache (no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _decodes(path, size: int) -> bool:
    """The check generate.py ran before (kept here as the baseline): decode the whole PNG on one thread."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode != "RGB" or im.size != (size, size):
                return False
            im.load()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def bench_resume_check(args) -> list[dict]:
    import torch

    from generation.images import png_path, write_png_atomic
    from generation.runner import find_missing
    from utils.distributed import DistContext

    ctx = DistContext(0, 1, 0, torch.device("cpu"), False)
    table = Table(f"generate.py resume check, {args.size}x{args.size} PNGs", [
        ("images", "images"), ("cache", "cache"), ("check", "check"), ("seconds", "seconds"), ("cpu_s", "CPU s"),
        ("ms_per_image", "ms/image"), ("peak_rss_mib", "peak RSS MiB")])
    work = tempfile.mkdtemp(prefix="bench-resume-", dir=args.dir)
    try:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:args.size, 0:args.size]
        for i in range(max(args.images)):  # smooth colour fields with noise: compress like samples
            freq = rng.uniform(0.01, 0.1, (2, 3))
            image = 128 + 100 * np.sin(xx[..., None] * freq[0] + yy[..., None] * freq[1])
            image = (image + rng.normal(0, 4, image.shape)).clip(0, 255).astype(np.uint8)
            write_png_atomic(png_path(work, i), image)
        checks = {"find_missing": lambda n: find_missing(work, n, args.size, ctx),
                  "decode (before)": lambda n: [i for i in range(n) if not _decodes(png_path(work, i), args.size)]}
        for n in args.images:
            for cache in ("warm", "cold"):
                for name in args.checks:
                    if cache == "cold":
                        drop_from_page_cache([png_path(work, i) for i in range(n)])
                    t, cpu = time.perf_counter(), time.process_time()
                    missing = checks[name](n)
                    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
                    assert missing == [], missing[:5]
                    table.add({"images": n, "cache": cache, "check": name, "seconds": wall, "cpu_s": cpu,
                               "ms_per_image": wall / n * 1e3, "peak_rss_mib": _status_mib()["VmHWM"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return table.rows


# ------------------------------------------------------------------ per-image datasets

def write_dataset_json(folder: str, n: int) -> None:
    """dataset.json of `n` per-image latents in encode's layout, 1000 classes (no latent files)."""
    os.makedirs(folder, exist_ok=True)
    labels = [[f"{i // 1000:05d}/img-mean-std-{i:08d}.npy", i % 1000] for i in range(n)]
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"labels": labels, "classes": [f"n{k:08d}" for k in range(1000)]}, f)


def per_image_child(folder: str, batches: int, batch_size: int, workers: int, gc_freeze: bool = False) -> dict:
    """In a fresh process: RSS around `open_dataset`, then the workers' private memory."""
    import gc
    import io

    import torch

    import data

    imported = _status_mib()["VmRSS"]
    t = time.perf_counter()
    dataset = data.open_dataset(folder)
    opened = time.perf_counter() - t
    after = _status_mib()
    buf = io.BytesIO()
    np.save(buf, np.zeros((8, 4, 4), np.float32))
    payload = buf.getvalue()
    type(dataset)._read = lambda self, relpath: payload  # the bookkeeping runs, the disk is not needed
    dataset._item_shape = (8, 4, 4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    if gc_freeze:  # the workers' collector then leaves the parent's objects (and their pages) alone
        gc.freeze()
    it = iter(loader)
    next(it)
    kids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == os.getpid()]
    first = [_private_mib(p) for p in kids]
    for _ in range(min(batches, len(loader)) - 1):
        next(it)
    last = [_private_mib(p) for p in kids]
    del it
    return {"items": len(dataset), "open_s": opened, "rss_imported_mib": imported, "rss_open_mib": after["VmRSS"],
            "peak_open_mib": after["VmHWM"], "worker_private_first_mib": max(first),
            "worker_private_last_mib": max(last)}


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def bench_per_image(args) -> list[dict]:
    table = Table(f"per-image latents dataset: open, then {args.workers} workers x {args.batches} batches of "
                  f"{args.batch_size}{', gc.freeze() before the workers start' if args.gc_freeze else ''}", [
                      ("items", "items"), ("open_s", "open s"), ("rss_imported_mib", "RSS imports MiB"),
                      ("retained_mib", "+ after open MiB"), ("peak_extra_mib", "+ peak MiB"),
                      ("worker_private_first_mib", "worker private first MiB"),
                      ("worker_private_last_mib", "last MiB")])
    work = tempfile.mkdtemp(prefix="bench-per-image-", dir=args.dir)
    try:
        for n in args.items:
            folder = os.path.join(work, str(n))
            write_dataset_json(folder, n)
            cmd = [sys.executable, "-m", "bench.scale", "per-image-child", folder, "--batches", str(args.batches),
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers)] + (
                       ["--gc-freeze"] if args.gc_freeze else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["retained_mib"] = row["rss_open_mib"] - row["rss_imported_mib"]
            row["peak_extra_mib"] = row["peak_open_mib"] - row["rss_imported_mib"]
            table.add(row)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return table.rows


# ------------------------------------------------------------------ train.py's main process

HEAVY = ("torch", "accelerate", "diffusers", "timm", "wandb", "triton", "torchvision", "scipy", "matplotlib",
         "skimage", "torch_fidelity", "omegaconf", "PIL", "numpy", "safetensors", "huggingface_hub", "tqdm")
PHASES = {  # training.loop name -> phase label
    "create_accelerator": "accelerator", "write_demo_data": "demo data written", "open_training_dataset": "dataset",
    "resume_target": "resume target", "run_stage_scales": "stage scales", "build_train_state": "model, EMA, AdamW",
    "bad_sample_guard": "loader dataset", "load_decoder_vae": "preview VAE", "make_previewer": "previewer",
    "make_evaluator": "evaluator", "RunLogger": "logger",
}


class _FirstImports:
    """A meta-path hook that records, for each of HEAVY, the repository line whose import statement
    loaded it first (spec look-ups that import nothing, such as importlib.util.find_spec, are ignored)."""

    def __init__(self, root: str):
        self.root, self.first = root, {}

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in HEAVY and top not in self.first:
            frames, frame = [], sys._getframe(1)
            while frame is not None:
                frames.append(frame)
                frame = frame.f_back
            if not any(f.f_code.co_name == "_find_and_load" for f in frames):
                return None
            ours = [f for f in frames if f.f_code.co_filename.startswith(self.root)
                    and "/bench/" not in f.f_code.co_filename]
            self.first[top] = (f"{os.path.relpath(ours[0].f_code.co_filename, self.root)}:{ours[0].f_lineno}"
                               if ours else "?")
        return None


def _import_cost(modules: list[str]) -> float:
    """MiB of RSS that importing `modules` (after torch, which everything imports) adds in a fresh process."""
    code = ("import importlib, json, sys, torch\n"
            "def rss():\n"
            "    return [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')][0]\n"
            "a = rss()\n"
            "for name in json.loads(sys.stdin.read()):\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception:\n"
            "        pass\n"
            "print((rss() - a) / 1024)")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(sorted(modules)), capture_output=True,
                         text=True)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")


def bench_train_memory(args) -> list[dict]:
    import tracemalloc

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hook = _FirstImports(root)
    sys.meta_path.insert(0, hook)
    tracemalloc.start()
    rows = []
    table = Table("train.py main process (demo_cpu.yaml, max_train_steps=1)", [
        ("phase", "after"), ("rss_mib", "VmRSS MiB"), ("hwm_mib", "VmHWM MiB"), ("python_mib", "Python heap MiB"),
        ("modules", "modules"), ("new", "modules imported in the phase (top packages)")])

    seen = set(sys.modules)

    def record(phase: str) -> None:
        status = _status_mib()
        new = collections.Counter(name.partition(".")[0] for name in set(sys.modules) - seen)
        seen.update(sys.modules)
        table.add({"phase": phase, "rss_mib": status["VmRSS"], "hwm_mib": status["VmHWM"],
                   "python_mib": tracemalloc.get_traced_memory()[0] / 2 ** 20, "modules": len(sys.modules),
                   "new": ", ".join(f"{k} {v}" for k, v in new.most_common(6))})

    record("interpreter start")
    import torch  # noqa: F401

    record("import torch")
    import train
    import training.loop as loop
    from training.config import parse_config

    record("import train, training.loop")

    def wrapped(name, fn):
        def call(*a, **k):
            out = fn(*a, **k)
            record(PHASES[name])
            return out
        return call

    for name in PHASES:
        setattr(loop, name, wrapped(name, getattr(loop, name)))
    step = loop.TrainStep.finish
    loop.TrainStep.finish = lambda self, *a, **k: (step(self, *a, **k), record("first step"))[0]
    folder_save = loop.RunFolder.save_checkpoint
    loop.RunFolder.save_checkpoint = lambda self, *a, **k: (folder_save(self, *a, **k), record("checkpoint"))[0]
    work = tempfile.mkdtemp(prefix="bench-train-memory-", dir=args.dir)
    try:
        argv = ["--config", os.path.join(root, "experiments/train/demo_cpu.yaml"), f"output_dir={work}",
                f"data_dir={work}/data", "max_train_steps=1", *args.overrides]
        code = train.main(argv)
        record(f"end of train.main (exit {code})")
        del parse_config
    finally:
        sys.meta_path.remove(hook)
        shutil.rmtree(work, ignore_errors=True)
    again = Table("train.py main process, all phases (demo_cpu.yaml, max_train_steps=1)", table.columns)
    again.add_all(table.rows)  # once more, in one piece: the progress bar interleaves with the first print
    imports = Table("packages the run imported: who first, and the RSS their modules add after torch (fresh process)",
                    [("package", "package"), ("modules", "modules"), ("first_from", "first imported from"),
                     ("rss_mib", "RSS MiB")])
    for package in HEAVY:
        modules = [m for m in sys.modules if m.partition(".")[0] == package]
        if modules and package != "torch":
            imports.add({"package": package, "modules": len(modules),
                         "first_from": hook.first.get(package, "before the hook"), "rss_mib": _import_cost(modules)})
    dynamo = [m for m in sys.modules if m.startswith(("torch._dynamo", "torch._inductor", "sympy", "mpmath"))]
    imports.add({"package": "torch._dynamo, _inductor, sympy", "modules": len(dynamo),
                 "first_from": "torch.optim.Optimizer.add_param_group", "rss_mib": _import_cost(dynamo)})
    return table.rows + imports.rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("resume-check")
    r.add_argument("--images", type=int, nargs="+", default=[1000, 5000, 20000])
    r.add_argument("--size", type=int, default=32)
    r.add_argument("--checks", nargs="+", choices=["find_missing", "decode (before)"],
                   default=["decode (before)", "find_missing"])
    r.add_argument("--dir", default=None, help="scratch folder (default: the system's temporary folder)")
    p = sub.add_parser("per-image")
    p.add_argument("--items", type=int, nargs="+", default=[50000, 200000, 1281167])
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dir", default=None)
    p.add_argument("--gc-freeze", action="store_true", help="gc.freeze() in the parent before the workers start")
    t = sub.add_parser("train-memory")
    t.add_argument("overrides", nargs="*", help="extra train.py key=value settings")
    t.add_argument("--dir", default=None)
    c = sub.add_parser("per-image-child")
    c.add_argument("folder")
    c.add_argument("--batches", type=int, default=150)
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--gc-freeze", action="store_true")
    args = parser.parse_args(argv)
    if args.what == "per-image-child":
        print(json.dumps(per_image_child(args.folder, args.batches, args.batch_size, args.workers, args.gc_freeze)))
        return []
    _header()
    return {"resume-check": bench_resume_check, "per-image": bench_per_image,
            "train-memory": bench_train_memory}[args.what](args)


if __name__ == "__main__":
    main()

"""Packed-latents loader on a cold page cache: bytes read from disk per item delivered, items/s, worker memory.

    python -m bench.loader_io --dir /big/scratch --sizes 20000 80000 320000 --items 20000 --workers 2

Writes synthetic packed datasets in the documented layout (docs/DATA.md "Formats": random
float32 moments (8, 32, 32), 32 KiB per item, shards of 10,000 items; the smaller sizes are the
first shards of the largest one, hard-linked, so the disk holds the largest size once), then for
each size and reader draws the same `--items` random indices through a DataLoader.

Before every run the shards are made cold (`--cache cold`, the default): `fsync`, then `posix_fadvise(POSIX_FADV_DONTNEED)`
over each file (no root needed; the page cache drops the clean pages), and the fraction of
their pages still resident is printed (`mincore`). Bytes read from disk are the `read_bytes`
of `/proc/PID/io` of the main process and of every DataLoader worker, read before the workers
exit: what the kernel fetched from the block device for them, readahead included. `--cache warm`
reads every shard once before the run instead (a dataset that fits in the page cache, after its
first epoch).

Readers:
  dataset      `data.open_dataset` (what training uses)
  mmap         np.load(mmap_mode="r") + a copy of the row: the reader before this benchmark
  mmap-random  the same map advised MADV_RANDOM (no readahead on page faults)

Linux only (`/proc`). The datasets are removed at the end unless `--keep`.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.benchmark import write_synthetic_packed  # noqa: E402
from bench.scale import drop_from_page_cache  # noqa: E402
from bench.table import Table  # noqa: E402

COLUMNS = [("items", "dataset items"), ("cache", "cache"), ("reader", "reader"), ("items_per_sec", "items/s"),
           ("disk_mb", "MB read"), ("read_per_item", "read / item bytes"), ("worker_rss_mb", "worker RSS MB"),
           ("shard_rss_mb", "of it shard pages MB"), ("cpu_s", "CPU s"), ("resident_before", "cached before")]


# ------------------------------------------------------------------ datasets

def make_datasets(root: str, sizes: list[int], latent_size: int = 32, shard_size: int = 10000) -> dict[int, str]:
    """{size: folder}; the largest is written, the others hard-link its first shards."""
    for n in sizes:
        if n % shard_size:
            raise SystemExit(f"--sizes must be multiples of --shard-size {shard_size} (whole shards), got {n}")
    largest = max(sizes)
    folders = {n: os.path.join(root, f"packed-{n}") for n in sizes}
    os.makedirs(folders[largest], exist_ok=True)
    t = time.time()
    write_synthetic_packed(folders[largest], largest, latent_size, shard_size)
    print(f"wrote {largest} items ({largest * 32 * latent_size ** 2 / 1024 ** 3:.2f} GiB) in {time.time() - t:.0f} s",
          flush=True)
    with open(os.path.join(folders[largest], "index.json")) as f:
        index = json.load(f)
    labels = np.load(os.path.join(folders[largest], "labels.npy"))
    for n in sizes:
        if n == largest:
            continue
        os.makedirs(folders[n], exist_ok=True)
        shards = [s for s in index["shards"] if s["start"] < n]
        for s in shards:
            os.link(os.path.join(folders[largest], s["file"]), os.path.join(folders[n], s["file"]))
        np.save(os.path.join(folders[n], "labels.npy"), labels[:n])
        with open(os.path.join(folders[n], "index.json"), "w") as f:
            json.dump({**index, "num_items": n, "shards": shards}, f)
    return folders


def _shard_paths(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("shard-"))


def make_cold(folder: str) -> None:
    drop_from_page_cache(_shard_paths(folder))


def resident_fraction(folder: str) -> float:
    """Fraction of the shards' pages in the page cache (mincore on a private map that is never touched)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    resident = total = 0
    for path in _shard_paths(folder):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
            try:
                pages = -(-size // page)
                vec = ctypes.create_string_buffer(pages)
                anchor = ctypes.c_char.from_buffer(mm)
                if libc.mincore(ctypes.addressof(anchor), size, vec) != 0:
                    raise OSError(ctypes.get_errno(), "mincore failed")
                del anchor
                resident += sum(b & 1 for b in vec.raw)
                total += pages
            finally:
                mm.close()
    return resident / max(total, 1)


# ------------------------------------------------------------------ readers to compare against

class MappedRows(torch.utils.data.Dataset):
    """Rows of a packed folder through a memory map of each shard, optionally advised MADV_RANDOM."""

    def __init__(self, folder: str, advice: int | None = None):
        with open(os.path.join(folder, "index.json")) as f:
            index = json.load(f)
        self.shards, self.shard_size = index["shards"], index["shard_size"]
        self.folder, self.advice = folder, advice
        self.labels = np.load(os.path.join(folder, "labels.npy"))
        self._maps = {}

    def __len__(self) -> int:
        return len(self.labels)

    def _rows(self, s: int) -> np.ndarray:
        if s not in self._maps:
            rows = np.load(os.path.join(self.folder, self.shards[s]["file"]), mmap_mode="r")
            if self.advice is not None:
                rows._mmap.madvise(self.advice)  # the mmap.mmap under np.memmap
            self._maps[s] = rows
        return self._maps[s]

    def __getitem__(self, i: int):
        s, row = divmod(i, self.shard_size)
        return torch.from_numpy(np.array(self._rows(s)[row])), int(self.labels[i])


def open_reader(name: str, folder: str):
    if name == "dataset":
        import data

        return data.open_dataset(folder)
    if name == "mmap":
        return MappedRows(folder)
    if name == "mmap-random":
        return MappedRows(folder, mmap.MADV_RANDOM)
    raise SystemExit(f"unknown reader {name!r}")


# ------------------------------------------------------------------ /proc

def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _proc_fields(pid: int, name: str) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/{name}") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0])
    return out


def _mapped_rss(pid: int, folder: str) -> int:
    """KiB of the shards' pages mapped into process `pid` (Rss of its mappings of files under `folder`)."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line: range perms offset dev inode [path]
                inside = len(head) >= 6 and head[5].startswith(folder)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


def make_warm(folder: str) -> None:
    """Read every shard once, so that the run finds all of it in the page cache."""
    for path in _shard_paths(folder):
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 24):
                pass


def run_one(reader: str, folder: str, indices: np.ndarray, workers: int, batch: int, cache: str = "cold") -> dict:
    dataset = open_reader(reader, folder)
    (make_cold if cache == "cold" else make_warm)(folder)
    resident = resident_fraction(folder)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=indices.tolist(), num_workers=workers)
    me = os.getpid()
    read0 = _proc_fields(me, "io")["read_bytes"]
    cpu0 = time.process_time()
    t = time.perf_counter()
    it = iter(loader)
    delivered = 0
    for _ in range(len(loader)):  # not past the end: the workers must still be alive to be read
        x, _ = next(it)
        delivered += x.shape[0]
    wall = time.perf_counter() - t
    kids = _children(me) if workers else []
    disk = _proc_fields(me, "io")["read_bytes"] - read0
    cpu = time.process_time() - cpu0
    rss, shard_pages = [], []
    for pid in kids:
        disk += _proc_fields(pid, "io")["read_bytes"]
        rss.append(_proc_fields(pid, "status")["VmRSS"])
        shard_pages.append(_mapped_rss(pid, os.path.realpath(folder)))
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if not workers:
        rss, shard_pages = [_proc_fields(me, "status")["VmRSS"]], [_mapped_rss(me, os.path.realpath(folder))]
    del it
    item_bytes = int(np.prod(dataset[0][0].shape)) * 4
    return {"items": len(dataset), "reader": reader, "cache": cache, "delivered": delivered, "items_per_sec": delivered / wall,
            "seconds": wall, "disk_mb": disk / 1e6, "read_per_item": disk / (delivered * item_bytes),
            "worker_rss_mb": max(rss) / 1024, "shard_rss_mb": max(shard_pages) / 1024, "cpu_s": cpu,
            "resident_before": f"{resident:.1%}"}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one); needs the largest "
                        "size x 32 KiB of disk")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 80000, 320000])
    parser.add_argument("--items", type=int, default=20000, help="random items delivered per run")
    parser.add_argument("--readers", nargs="+", default=["mmap", "mmap-random", "dataset"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", nargs="+", choices=["cold", "warm"], default=["cold"],
                        help="cold: the shards dropped from the page cache before each run; warm: read once before")
    parser.add_argument("--latent-size", type=int, default=32, help="h = w of the (8, h, w) moments (32: 256 px)")
    parser.add_argument("--shard-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--keep", action="store_true", help="keep the datasets in DIR/bench-loader-io (reruns reuse "
                        "them); without it they go to a new temporary folder under DIR, removed at the end")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {platform.machine()} {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}, kernel {platform.release()}, Python {platform.python_version()}", flush=True)
    if args.keep and not args.dir:
        parser.error("--keep needs --dir")
    root = (os.path.join(args.dir, "bench-loader-io") if args.keep
            else tempfile.mkdtemp(prefix="bench-loader-io-", dir=args.dir))
    table = Table(f"packed loader, {args.items} random items, {args.workers} workers, "
                  f"batch {args.batch_size}", COLUMNS)
    try:
        existing = {n: os.path.join(root, f"packed-{n}") for n in args.sizes}
        if all(os.path.isfile(os.path.join(f, "index.json")) for f in existing.values()):
            folders = existing
        else:
            folders = make_datasets(root, args.sizes, args.latent_size, args.shard_size)
        for n in sorted(args.sizes):
            indices = np.random.default_rng(0).permutation(n)[:args.items]
            for cache in args.cache:
                for reader in args.readers:
                    table.add(run_one(reader, folders[n], indices, args.workers, args.batch_size, cache))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cores": os.cpu_count(),
                           "args": vars(args), "rows": table.rows}, f, indent=1)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return table.rows


if __name__ == "__main__":
    main()

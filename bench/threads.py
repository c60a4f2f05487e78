"""How many torch CPU threads each entry point should use, idle and beside other jobs.

    python -m bench.threads --out docs/perf/threads.json [--repeats 3] [--only generate,train]

Runs each entry point as a whole process (train.py, generate.py, the budget sweep, evaluate and
ref_stats) on tiny work prepared here (the CPU demo's data, a short-trained checkpoint of each
kind), with `cpu_threads` = 1, = the usable CPUs, and left to the default rule
(`utils/threads.py`), on an idle machine and with one busy-looping process per CPU beside it (the
"loaded" case: other jobs on the cores). Prints a table of the median wall seconds of `--repeats`
runs per cell and writes every run to `--out`. Interleaved: each repeat runs every setting once, so
drift of the machine shows in all of them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "{depth: 2, hidden_size: 64, num_heads: 4}"


def _run(argv: List[str], env: Optional[dict] = None, cwd: str = REPO) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def prepare(work: str) -> Dict[str, str]:
    """The demo dataset, a short DFM-SiT checkpoint (the demo's model), a tiny multi-budget ELIT one,
    and .npz image sets for the evaluation tools."""
    py = sys.executable
    data = os.path.join(work, "data")
    common = ["vae=none", "resolution=16", "num_classes=8", f"data_dir={data}", "make_demo_data=true",
              "demo_images_per_class=50", "cpu_threads=1", f"output_dir={work}", "preview.num_samples=0",
              "report_to=none", "num_workers=0", "mixed_precision=no"]
    _run([py, "train.py", "--config", "experiments/train/demo_cpu.yaml", *common, "exp_name=dfm",
          "max_train_steps=50", "checkpointing_steps=50"])
    _run([py, "train.py", "--config", "experiments/train/demo_cpu_elit.yaml", *common, "exp_name=elit",
          "max_train_steps=20", "checkpointing_steps=20"])
    ref, smp = os.path.join(work, "ref.npz"), os.path.join(work, "smp.npz")
    import numpy as np

    rng = np.random.default_rng(0)
    for path in (ref, smp):
        np.savez(path, arr_0=rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8))
    return {"data": data, "dfm": os.path.join(work, "dfm", "checkpoints", "0000050.pt"),
            "elit": os.path.join(work, "elit", "checkpoints", "0000020.pt"), "ref": ref, "smp": smp}


def commands(paths: Dict[str, str], work: str, threads: Optional[int]) -> Dict[str, List[str]]:
    """The entry points with `threads` CPU threads (None: leave the setting out, the default rule)."""
    py = sys.executable
    key = [] if threads is None else [f"cpu_threads={threads}"]
    flag = [] if threads is None else ["--cpu-threads", str(threads)]
    tag = "default" if threads is None else str(threads)
    return {
        "train": [py, "train.py", "--config", "experiments/train/demo_cpu.yaml", f"data_dir={paths['data']}",
                  f"output_dir={work}", f"exp_name=train-{tag}-{time.time_ns()}", "max_train_steps=100",
                  "checkpointing_steps=100", "preview.num_samples=0", "demo_images_per_class=50",
                  "cpu_threads=null", *key],
        "generate": [py, "generate.py", "--ckpt", paths["dfm"], "num_samples=64", "per_proc_batch_size=64",
                     f"sample_dir={work}/gen", f"run_name=g-{tag}-{time.time_ns()}", "save_png=false", *key],
        "budget_sweep": [py, "-m", "generation.budget_sweep", "--ckpt", paths["elit"], "--class-label", "3",
                         "num_seeds=4", f"sample_dir={work}/sweep", f"run_name=s-{tag}-{time.time_ns()}", *key],
        "evaluate": [py, "-m", "evaluation.evaluate", paths["ref"], paths["smp"], "--metrics", "swd",
                     "--no-progress", *flag],
        "ref_stats": [py, "-m", "evaluation.ref_stats", paths["ref"], "--out", f"{work}/stats-{tag}.npz",
                      "--metrics", "swd", "--device", "cpu", "--no-progress", *flag],
    }


class Load:
    """One busy-looping process per CPU (other jobs on the cores) while the block runs."""

    def __init__(self, active: bool):
        self.active, self.procs = active, []

    def __enter__(self):
        if self.active:
            cpus = len(os.sched_getaffinity(0))
            self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
            time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON file of every run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=None, help="comma-separated entry points")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    cpus = len(os.sched_getaffinity(0))
    settings = [1, cpus, None]
    work = args.work or tempfile.mkdtemp(prefix="threads-")
    env = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    os.environ.update(env)
    os.environ.pop("OMP_NUM_THREADS", None)  # the default rule reads it; measure the machine as a user has it
    paths = prepare(work)
    names = list(commands(paths, work, 1))
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    runs = []
    for loaded in (False, True):
        with Load(loaded):
            for repeat in range(args.repeats):
                for threads in settings:
                    cmds = commands(paths, work, threads)
                    for name in names:
                        seconds = _run(cmds[name])
                        runs.append({"entry": name, "loaded": loaded, "threads": threads or "default",
                                     "repeat": repeat, "seconds": seconds})
                        print(json.dumps(runs[-1]), flush=True)
    header = f"| entry point | load | 1 thread | {cpus} threads | default |"
    lines = [header, "|---|---|---|---|---|"]
    for name in names:
        for loaded in (False, True):
            cells = []
            for threads in [1, cpus, "default"]:
                values = [r["seconds"] for r in runs if r["entry"] == name and r["loaded"] == loaded
                          and r["threads"] == threads]
                cells.append(f"{statistics.median(values):.2f} s")
            lines.append(f"| {name} | {'loaded' if loaded else 'idle'} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "cpus": cpus,
                       "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "runs": runs,
                       "table": lines}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Host overhead of the training loop: time per step outside forward, backward and the optimizer.

    python -m bench.host_overhead [--steps 300] [--repeats 3] [--out docs/perf/host-overhead.json]

Runs the real loop (`training.loop.train`) on the CPU demo's configuration
(experiments/train/demo_cpu.yaml: DFM-SiT, 16 px, batch 32, one thread, no previews or
checkpoints inside the measured steps) and times its parts by wrapping them: the bare step
(objective forward, backward, AdamW step and zero_grad) against everything else the loop does
per step: data (loader, corrupt-sample check, seeding, batch to device, ELIT budget), gradient
clipping, LR schedule, EMA, metrics, logging, progress bar, and the rest of the loop's own code
(the interval between two steps minus every timed part). Times are CPU time of the process (one
torch thread: the work done, little affected by other processes) and wall time; steady-state
steps only (the first `--skip` steps are left out). No timing is asserted by a test.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BARE = ("forward", "backward", "optimizer")


class PartTimer:
    """Accumulates (wall, CPU) seconds per part name for the current step; `end_step` files them."""

    def __init__(self):
        self.current = defaultdict(lambda: [0.0, 0.0])
        self.steps = []  # per step: {part: (wall, cpu)}, plus "interval"
        self.last_end = None

    def wrap(self, owner, name: str, part: str):
        original = getattr(owner, name)
        timer = self

        @functools.wraps(original)  # keeps the signature (accelerate inspects zero_grad's)
        def timed(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                acc = timer.current[part]
                acc[0] += time.perf_counter() - w0
                acc[1] += time.process_time() - c0
        setattr(owner, name, timed)
        return original

    def end_step(self):
        now = (time.perf_counter(), time.process_time())
        if self.last_end is not None:
            record = {k: tuple(v) for k, v in self.current.items()}
            record["interval"] = (now[0] - self.last_end[0], now[1] - self.last_end[1])
            self.steps.append(record)
        self.current.clear()
        self.last_end = now


def instrument(timer: PartTimer) -> list:
    """Wrap the loop's parts; returns [(owner, name, original)] to undo."""
    import torch
    import tqdm
    from accelerate import Accelerator

    import dfm
    import training.loop as loop
    from data.robust import BadSampleTracker
    from training.budget import BudgetSampler
    from training.ema import EMA
    from training.logger import RunLogger
    from training.step import TrainStep

    loader_iter = type(iter(torch.utils.data.DataLoader([0])))
    parts = [
        (dfm.FlowMatchingObjective, "__call__", "forward"),
        (Accelerator, "backward", "backward"),
        (torch.optim.AdamW, "step", "optimizer"),
        (torch.optim.AdamW, "zero_grad", "optimizer"),
        (loader_iter, "__next__", "data: loader"),
        (BadSampleTracker, "observe", "data: corrupt-sample check"),
        (loop, "seed_micro_batch", "data: seeding"),
        (loop.BatchPreparer, "__call__", "data: to device"),
        (BudgetSampler, "__call__", "data: ELIT budget"),
        (Accelerator, "clip_grad_norm_", "gradient clipping"),
        (torch.optim.lr_scheduler.LambdaLR, "step", "LR schedule"),
        (EMA, "update", "EMA"),
        (loop.MetricWindow, "add_micro_batch", "metrics"),
        (loop.MetricWindow, "add_step", "metrics"),
        (loop.MetricWindow, "read", "logging"),
        (loop.MetricWindow, "first_nonfinite_step", "logging"),
        (RunLogger, "log_metrics", "logging"),
        (tqdm.tqdm, "update", "progress bar"),
    ]
    undo = [(owner, name, timer.wrap(owner, name, part)) for owner, name, part in parts]
    finish = TrainStep.finish

    def finish_and_mark(self, *args):
        finish(self, *args)
        timer.end_step()
    TrainStep.finish = finish_and_mark
    undo.append((TrainStep, "finish", finish))
    return undo


def run_once(steps: int, skip: int, data_dir: str, out_dir: str, name: str) -> dict:
    """One instrumented training run; per-step averages (ms) over the steady steps."""
    from training.config import parse_config
    from training.loop import train

    argv = ["--config", "experiments/train/demo_cpu.yaml", f"data_dir={data_dir}", f"output_dir={out_dir}",
            f"exp_name={name}", f"max_train_steps={steps}", f"checkpointing_steps={10 * steps}",
            "sampling_steps=0", "preview.num_samples=0", "log_every=50", "resume=none"]
    timer = PartTimer()
    undo = instrument(timer)
    try:
        train(parse_config(argv), stop_after_step=steps)  # no final checkpoint inside the numbers
    finally:
        for owner, attr, original in undo:
            setattr(owner, attr, original)
    measured = timer.steps[skip:]
    names = sorted({k for rec in measured for k in rec} - {"interval"})
    result = {}
    for clock, i in (("wall", 0), ("cpu", 1)):
        per = {k: 1000 * sum(rec.get(k, (0.0, 0.0))[i] for rec in measured) / len(measured) for k in names}
        interval = 1000 * sum(rec["interval"][i] for rec in measured) / len(measured)
        per["other loop code"] = interval - sum(per.values())
        bare = sum(per[k] for k in BARE)
        result[clock] = {"step_ms": interval, "bare_ms": bare, "overhead_ms": interval - bare,
                         "overhead_share": (interval - bare) / bare, "parts_ms": per}
    result["steps_measured"] = len(measured)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip", type=int, default=20, help="first steps left out (warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from training.demo_data import write_demo_dataset

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_demo_dataset(os.path.join(tmp, "shapes16"), resolution=16, num_classes=8,
                                  images_per_class=200, seed=0)
        for r in range(args.repeats):
            runs.append(run_once(args.steps, args.skip, data, tmp, f"run{r}"))
            print(json.dumps({"repeat": r, **{c: {k: v for k, v in runs[-1][c].items() if k != "parts_ms"}
                                              for c in ("cpu", "wall")}}), flush=True)
    summary = {"loadavg": os.getloadavg(), "runs": runs}
    print("| part | CPU ms/step (median of runs) | wall ms/step |\n|---|---|---|")
    for part in runs[0]["cpu"]["parts_ms"]:
        cpu = statistics.median(r["cpu"]["parts_ms"][part] for r in runs)
        wall = statistics.median(r["wall"]["parts_ms"][part] for r in runs)
        print(f"| {part} | {cpu:.3f} | {wall:.3f} |")
    for key in ("step_ms", "bare_ms", "overhead_ms", "overhead_share"):
        print(f"| {key} | {statistics.median(r['cpu'][key] for r in runs):.3f} | "
              f"{statistics.median(r['wall'][key] for r in runs):.3f} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()

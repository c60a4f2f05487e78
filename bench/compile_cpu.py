"""torch.compile on the CPU (inductor): eager vs compiled step time and compile time.

    python -m bench.compile_cpu --out docs/perf/cpu-compile.json     # the table of docs/PERFORMANCE.md
    python -m bench.compile_cpu --cases elit-train --strategies regional,regional-static,whole

Every (case, strategy) runs in a fresh process with an empty inductor cache and one compile
thread, so the compile time is what a user's first run pays and all of it is this process's CPU
time. Inside it an eager copy and a compiled copy of the same model (same weights) are timed
interleaved, round by round, so that load from other processes on a shared machine hits both
alike. Each time is reported twice: CPU time of the process (one torch thread: the work done,
barely affected by other processes) and wall time (what a user waits; on a loaded machine much
longer); medians over the rounds, with the range in the JSON.

Cases: `dfm` is the CPU demo's DFM-SiT (experiments/train/demo_cpu.yaml: 16 px, 2 stages,
batch 32); `elit` an ELIT-SiT of the same size with the ImageNet configs' 16 budget levels
(g = 4, elit_max_mask_prob 0.9375) on an 8x8 token grid. `-train` is the loop's step
(`training.step.TrainStep`: objective, backward, clipping, AdamW, EMA, metrics) at every budget
level in turn; `-sample` is `samplers.sample` (Euler, 10 steps, batch 16, no CFG) at every level.
Strategies: `regional` is `models.compile.compile_model` (what train.py, generate.py and the
budget sweep use); `whole` compiles the whole model (`torch.compile(model)`, what accelerate's
`dynamo_backend` did); `regional-static` compiles the same regions with `dynamic=False` and a
recompile limit raised to one graph per level. No timing here is asserted by a test.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {
    "dfm": ("DFM-SiT-S/4", dict(input_size=16, in_channels=3, depth=4, hidden_size=128, num_heads=4,
                                num_classes=8, stages=2)),
    "elit": ("ELIT-SiT-S/2", dict(input_size=16, in_channels=3, depth=4, hidden_size=128, num_heads=4,
                                  num_classes=8, encoder_depth=1, elit_tail_depth=1, group_size=4,
                                  elit_max_mask_prob=0.9375)),
}
CASES = ("dfm-train", "elit-train", "dfm-sample", "elit-sample")
STRATEGIES = ("regional", "whole", "regional-static")
TRAIN_BATCH, SAMPLE_BATCH, SAMPLE_STEPS = 32, 16, 10


def build(model_key: str):
    import torch

    import models

    name, kwargs = MODELS[model_key]
    torch.manual_seed(0)
    return models.create_model(name, **kwargs)


def apply_strategy(model, strategy: str):
    import torch

    from models.compile import compile_model, compiled_regions, graphs_per_block

    if strategy == "regional":
        return compile_model(model)
    if strategy == "whole":
        return torch.compile(model)
    if strategy == "regional-static":
        torch._dynamo.config.recompile_limit = max(8, graphs_per_block(model))
        for region in compiled_regions(model):
            region.compile(dynamic=False)
        return model
    raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")


def _levels(model) -> list:
    from models import budget_levels

    return budget_levels(model) or [None]


def train_runner(model, levels):
    """A function running one training step (TrainStep, as the loop) at levels[i % len(levels)]."""
    import torch
    from accelerate import Accelerator

    from training.config import recipe_objective
    from training.ema import EMA, create_ema
    from training.metrics import MetricWindow
    from training.step import TrainStep

    model.train()
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    objective = recipe_objective(model.num_stages, stage_sampling="per_sample")
    step = TrainStep(accelerator, model, objective, optimizer, schedule, EMA(model, create_ema(model), 0.99),
                     MetricWindow(model.num_stages, "cpu"), accumulation=1, max_grad_norm=1.0)
    g = torch.Generator().manual_seed(1)
    size = model.input_size
    x = torch.randn(TRAIN_BATCH, model.in_channels, size, size, generator=g)
    y = torch.randint(0, model.num_classes, (TRAIN_BATCH,), generator=g)
    generator = torch.Generator()
    count = [0]

    def run(i: int):
        budget = levels[i % len(levels)]
        kwargs = {} if budget is None else {"inference_budget": budget}
        generator.manual_seed(i)
        step.micro_batch(SimpleNamespace(x=x, y=y, encoder_features=None, model_kwargs=kwargs), generator, count[0], 0)
        step.finish()
        count[0] += 1
    return run


def sample_runner(model, levels):
    """A function running one sampling call (SAMPLE_STEPS Euler steps) at levels[i % len(levels)]."""
    import torch

    import samplers

    model.eval()
    g = torch.Generator().manual_seed(2)
    noise = [torch.randn(SAMPLE_BATCH, *shape, generator=g) for shape in model.stage_shapes]
    y = torch.randint(0, model.num_classes, (SAMPLE_BATCH,), generator=g)
    S = model.num_stages
    steps = [SAMPLE_STEPS] if S == 1 else [SAMPLE_STEPS - 2 * (S - 1)] + [2] * (S - 1)
    thresholds = [0.1 / 2 ** i for i in range(S - 1)]

    def run(i: int):
        samplers.sample(model, noise, y, num_steps_per_scale=steps, thresholds=thresholds,
                        inference_budget=levels[i % len(levels)])
    return run


def run_case(case: str, strategy: str, rounds: int, per_round: int, threads: int) -> dict:
    """One (case, strategy) in this process: compile time and interleaved eager/compiled timings."""
    import torch
    from torch._dynamo.utils import counters

    torch.set_num_threads(threads)
    model_key, kind = case.split("-")
    eager = build(model_key)
    compiled = apply_strategy(copy.deepcopy(eager), strategy)
    levels = _levels(eager)
    make = train_runner if kind == "train" else sample_runner
    run_eager, run_compiled = make(eager, levels), make(compiled, levels)
    warm = len(levels) if len(levels) > 1 else 2  # every level once (compiles what a run needs)

    def timed(fn, start: int, n: int):
        """(wall seconds, CPU seconds of this process) of calls start .. start + n - 1."""
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(start, start + n):
            fn(i)
        return time.perf_counter() - t0, time.process_time() - c0

    first_compiled = timed(run_compiled, 0, warm)
    first_eager = timed(run_eager, 0, warm)
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    wall, cpu = {"eager": [], "compiled": []}, {"eager": [], "compiled": []}
    for r in range(rounds):
        order = [("eager", run_eager), ("compiled", run_compiled)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            w, c = timed(fn, warm + r * per_round, per_round)
            wall[name].append(1000 * w / per_round)
            cpu[name].append(1000 * c / per_round)
    row = {"case": case, "strategy": strategy, "levels": len(levels) if levels[0] is not None else 0,
           "threads": threads, "rounds": rounds, "calls_per_round": per_round,
           "unit": "ms per training step" if kind == "train" else f"ms per sampling call ({SAMPLE_STEPS} steps)"}
    for clock, values in (("wall", wall), ("cpu", cpu)):
        for name in ("eager", "compiled"):
            row[f"{name}_{clock}_ms"] = statistics.median(values[name])
            row[f"{name}_{clock}_ms_range"] = [min(values[name]), max(values[name])]
        row[f"speedup_{clock}"] = row[f"eager_{clock}_ms"] / row[f"compiled_{clock}_ms"]
    # compile time: the first pass over every level minus what those steps cost once compiled
    row["compile_wall_s"] = first_compiled[0] - warm * row["compiled_wall_ms"] / 1000
    row["compile_cpu_s"] = first_compiled[1] - warm * row["compiled_cpu_ms"] / 1000
    row.update(graphs=graphs_after_warmup, graphs_after_timing=counters["stats"]["unique_graphs"],
               graph_breaks=sum(counters["graph_break"].values()),
               frames_failed=counters["frames"]["total"] - counters["frames"]["ok"])
    return row


def environment() -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "loadavg_1_5_15": load}


def table(rows: list) -> str:
    """Markdown: CPU time (this process, 1 thread) first, wall time in brackets."""
    lines = ["| case | strategy | eager ms | compiled ms | speed-up | compile s | graphs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['strategy']} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['strategy']} | {r['eager_cpu_ms']:.0f} ({r['eager_wall_ms']:.0f}) | "
                     f"{r['compiled_cpu_ms']:.0f} ({r['compiled_wall_ms']:.0f}) | {r['speedup_cpu']:.2f}x "
                     f"({r['speedup_wall']:.2f}x) | {r['compile_cpu_s']:.0f} ({r['compile_wall_s']:.0f}) | "
                     f"{r['graphs']} |")
    return "\n".join(lines)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--strategies", default="regional")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved eager/compiled rounds")
    parser.add_argument("--per-round", type=int, default=4, help="steps (sampling calls) per round and variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU demos use 1)")
    parser.add_argument("--out", default=None, help="write the environment and rows as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases, strategies = args.cases.split(","), args.strategies.split(",")
    if args.child:  # one case in this process; the parent reads the last line
        print(json.dumps(run_case(cases[0], strategies[0], args.rounds, args.per_round, args.threads)), flush=True)
        return []
    rows = []
    env = environment()
    for case in cases:
        for strategy in strategies:
            with tempfile.TemporaryDirectory() as cache:  # a cold inductor cache for every run
                # one compile thread: the compile work is then this process's CPU time
                child_env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, OMP_NUM_THREADS=str(args.threads),
                                 TORCHINDUCTOR_COMPILE_THREADS="1")
                cmd = [sys.executable, "-m", "bench.compile_cpu", "--child", "--cases", case, "--strategies", strategy,
                       "--rounds", str(args.rounds), "--per-round", str(args.per_round), "--threads", str(args.threads)]
                t0 = time.time()
                proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      env=child_env, capture_output=True, text=True)
            if proc.returncode == 0:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                row = {"case": case, "strategy": strategy, "error": proc.stderr.strip().splitlines()[-1][:200]}
            row["process_s"] = time.time() - t0
            row["loadavg_after"] = os.getloadavg()
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()

"""kill -9 a training run again and again, resume it each time, and check that it ends bit for
bit where an uninterrupted run ends.

    python -m bench.kill_resume --kills 20 --out /tmp/kill_resume      # ~5 min on 2 CPU cores

A tiny pixel-space DFM-SiT trains on the synthetic demo data with a checkpoint every few steps,
so many kills land while a checkpoint is being written. After each SIGKILL the script notes
whether a temporary checkpoint file was left behind (the kill hit a write) and relaunches with
`resume=auto`. When the kills are used up the run finishes; its final checkpoint (model, EMA,
optimizer, step) is compared tensor by tensor with the uninterrupted run's. A JSON summary is
printed and written to `<out>/kill_resume.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_argv(data_dir: str, out: str, exp_name: str, steps: int, every: int) -> list[str]:
    return [sys.executable, "train.py", "model=DFM-SiT-S/4",
            "model_overrides={depth: 2, hidden_size: 64, num_heads: 4}", f"data_dir={data_dir}",
            f"output_dir={out}", f"exp_name={exp_name}", "vae=none", "resolution=16", "num_classes=2",
            "batch_size=8", "num_workers=0", "mixed_precision=no", "lr=1e-3", "ema_decay=0.9",
            f"max_train_steps={steps}", f"checkpointing_steps={every}", "log_every=10", "sampling_steps=0",
            "report_to=none", "resume=auto", "preview.num_samples=0", "seed=3", "cpu_threads=1"]


def _env() -> dict:
    return dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def _temporaries(exp_dir: str) -> list[str]:
    folder = os.path.join(exp_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return [n for n in os.listdir(folder) if not n.split(".")[0].isdigit()]


def _newest_step(exp_dir: str) -> int:
    folder = os.path.join(exp_dir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    steps = [int(n[:-3]) for n in names if n.endswith(".pt") and n[:-3].isdigit()]
    return max(steps, default=0)


def compare_checkpoints(a_path: str, b_path: str) -> list[str]:
    """Names of the entries that differ between two training checkpoints (empty: bit-identical)."""
    import torch

    a = torch.load(a_path, map_location="cpu", weights_only=True)
    b = torch.load(b_path, map_location="cpu", weights_only=True)
    diff = [] if a["steps"] == b["steps"] else ["steps"]
    for group in ("model", "ema"):
        diff += [f"{group}.{k}" for k in a[group] if not torch.equal(a[group][k], b[group][k])]
    for index, state in a["opt"]["state"].items():
        for name, value in state.items():
            other = b["opt"]["state"][index][name]
            if torch.is_tensor(value) and not torch.equal(value, other):
                diff.append(f"opt.{index}.{name}")
    return diff


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--min-delay", type=float, default=2.0, help="earliest kill, seconds after launch")
    parser.add_argument("--max-delay", type=float, default=9.0, help="latest kill (start-up takes ~3-5 s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--out", default="/tmp/kill_resume")
    args = parser.parse_args(argv)
    sys.path.insert(0, REPO)
    from training.demo_data import write_demo_dataset

    os.makedirs(args.out, exist_ok=True)
    data = write_demo_dataset(os.path.join(args.out, "data"), resolution=16, num_classes=2, images_per_class=20,
                              seed=0)
    runs = os.path.join(args.out, "runs")
    t0 = time.time()
    straight = subprocess.run(run_argv(data, runs, "straight", args.steps, args.checkpoint_every), cwd=REPO,
                              env=_env(), capture_output=True, text=True)
    if straight.returncode != 0:
        print(straight.stderr[-3000:], file=sys.stderr)
        return 1
    rng = random.Random(args.seed)
    exp_dir = os.path.join(runs, "killed")
    kills, launches = [], 0
    while True:
        launches += 1
        proc = subprocess.Popen(run_argv(data, runs, "killed", args.steps, args.checkpoint_every), cwd=REPO,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if len(kills) >= args.kills:
            _, err = proc.communicate()
            if proc.returncode != 0:
                print(err[-3000:], file=sys.stderr)
                return 1
            break
        # some kills land in start-up (imports, resume), most in training or a checkpoint write
        delay = rng.uniform(args.min_delay, args.max_delay)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append({"after_s": round(delay, 2), "newest_checkpoint": _newest_step(exp_dir),
                          "during_write": bool(_temporaries(exp_dir))})
            continue
        if proc.returncode != 0:
            print(proc.stderr.read()[-3000:], file=sys.stderr)
            return 1
        break  # finished before the kill: nothing left to interrupt
    final = os.path.join(exp_dir, "checkpoints", f"{args.steps:07d}.pt")
    diff = compare_checkpoints(os.path.join(runs, "straight", "checkpoints", f"{args.steps:07d}.pt"), final)
    summary = {"kills": len(kills), "launches": launches,
               "kills_during_checkpoint_write": sum(k["during_write"] for k in kills),
               "kills_before_first_checkpoint": sum(k["newest_checkpoint"] == 0 for k in kills),
               "steps": args.steps, "checkpoint_every": args.checkpoint_every,
               "bit_identical": not diff, "differing_entries": diff[:20], "wall_s": round(time.time() - t0, 1),
               "detail": kills}
    with open(os.path.join(args.out, "kill_resume.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "detail"}))
    return 0 if not diff else 1


if __name__ == "__main__":
    sys.exit(main())

"""What post-hoc EMA snapshots cost as a run grows: disk, reconstruction memory and time, precision.

    python -m bench.posthoc_ema disk                        # snapshots and GB of a SiT-XL/2 run, 3 lengths
    python -m bench.posthoc_ema kernels                     # kernel errors of thinned snapshot sets
    python -m bench.posthoc_ema make DIR --count 100 [--legacy]   # N snapshots of the demo model in DIR
    python -m bench.posthoc_ema precision RUN               # float16 / bfloat16 snapshots against float32

`make` writes snapshots of random weights for the CPU demo's model (DFM-SiT-S/4, depth 4, width 128:
1.4M parameters, two profiles), as training writes them (float16, with the run identity) or, with
`--legacy`, as versions before 2026-12-07 wrote them (float32, no identity); time and measure
`python -m training.posthoc_ema DIR --std 0.07` on them from outside. `precision` needs a run trained
with `posthoc_ema.dtype=float32`: it reconstructs from its snapshots as stored and rounded to float16
and bfloat16, and compares weights and model outputs on fixed inputs with the float32 result.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEMO_MODEL = dict(name="DFM-SiT-S/4", depth=4, hidden_size=128, num_heads=4, input_size=16, in_channels=3,
                  num_classes=8)
PROFILES = [0.05, 0.10]
STDS = [0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20, 0.25]


def xl_parameters() -> int:
    """Numbers in a DFM-SiT-XL/2 state dict at 256 px (what one profile of a snapshot holds)."""
    from models import create_model

    with torch.device("meta"):
        model = create_model("DFM-SiT-XL/2", input_size=32)
    return sum(v.numel() for v in model.state_dict().values())


def disk(args) -> None:
    from training.posthoc_ema import kept_steps

    params = xl_parameters()
    snapshot = params * len(PROFILES)
    print(f"DFM-SiT-XL/2: {params:,} numbers per profile; a snapshot of {len(PROFILES)} profiles is "
          f"{snapshot * 4 / 1e9:.2f} GB in float32, {snapshot * 2 / 1e9:.2f} GB in float16")
    print(f"| run length | every {args.every}, all kept, float32 | keep={args.keep}, float16: at the end | "
          "largest during the run |")
    print("|---|---|---|---|")
    for steps in (100_000, 200_000, 400_000):
        counts = [len(kept_steps(t, args.every, args.keep)) for t in range(args.every, steps + 1, args.every)]
        print(f"| {steps:,} steps | {steps // args.every} = {steps // args.every * snapshot * 4 / 1e9:,.0f} GB | "
              f"{counts[-1]} = {counts[-1] * snapshot * 2 / 1e9:.0f} GB | {max(counts)} = "
              f"{max(counts) * snapshot * 2 / 1e9:.0f} GB |")


def kernels(args) -> None:
    from training.posthoc_ema import kept_steps, solve_coefficients, std_to_exponent

    def errors(steps, now):
        times = [s for s in steps for _ in PROFILES]
        gammas = [std_to_exponent(p) for _ in steps for p in PROFILES]
        return [solve_coefficients(times, gammas, now, std_to_exponent(s))[1] for s in STDS]

    print(f"kernel error (%) of the reconstruction at the newest snapshot, profiles {PROFILES}, every {args.every}")
    print("| snapshot set | count | " + " | ".join(f"{s:g}" for s in STDS) + " |")
    print("|---" * (len(STDS) + 2) + "|")
    now = 400_000
    full = list(range(args.every, now + 1, args.every))
    print(f"| all, at 400k | {len(full)} | " + " | ".join(f"{e * 100:.2f}" for e in errors(full, now)) + " |")
    for keep in (16, 24, 32):
        kept = kept_steps(now, args.every, keep)
        print(f"| keep={keep}, at 400k | {len(kept)} | " + " | ".join(f"{e * 100:.2f}" for e in errors(kept, now))
              + " |")
        worst, largest = np.zeros(len(STDS)), 0
        for t in range(50_000, now + 1, 5 * args.every):
            kept = kept_steps(t, args.every, keep)
            largest = max(largest, len(kept))
            worst = np.maximum(worst, errors(kept, t))
        print(f"| keep={keep}, worst over 50k..400k | {largest} (largest) | "
              + " | ".join(f"{e * 100:.2f}" for e in worst) + " |")


def make(args) -> None:
    from models import create_model
    from models.weights_io import export_weights
    from training.posthoc_ema.snapshots import SnapshotStore, new_run_identity, snapshot_path

    spec = dict(DEMO_MODEL)
    model = create_model(spec.pop("name"), **spec)
    state = model.state_dict()
    store = SnapshotStore(args.dir, new_run_identity(), None, args.every, 0, "float16")
    g = torch.Generator().manual_seed(0)
    for i in range(1, args.count + 1):
        step = i * args.every
        profiles = [{k: torch.randn(v.shape, generator=g) * 0.02 for k, v in state.items()} for _ in PROFILES]
        if args.legacy:
            export_weights(snapshot_path(args.dir, step), {f"p{j}": p for j, p in enumerate(profiles)},
                           arch=dict(model.arch), config={}, steps=step,
                           weights_info={"kind": "posthoc_ema_snapshot", "stds": PROFILES, "t": step})
        else:
            store.write(step, profiles, PROFILES, step, dict(model.arch), {})
    size = sum(os.path.getsize(os.path.join(args.dir, "posthoc_ema", n)) for n in os.listdir(
        os.path.join(args.dir, "posthoc_ema")))
    print(f"{args.count} snapshots, {size / 1e6:.0f} MB in {args.dir}/posthoc_ema")


def precision(args) -> None:
    from models import create_model
    from training.posthoc_ema import solve_coefficients, std_to_exponent
    from training.posthoc_ema.snapshot_file import SnapshotFile
    from training.posthoc_ema.snapshots import select_snapshots

    used = select_snapshots(args.run).used
    data = []
    for snap in used:
        with SnapshotFile(snap) as f:
            data.append({name: f.tensor(name) for name in snap.tensors})
    target = used[-1]
    keys = target.keys()
    times = [s.t for s in used for _ in s.stds]
    gammas = [std_to_exponent(p) for s in used for p in s.stds]
    model = create_model(**target.arch).eval()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, *shape, generator=g) for shape in model.stage_shapes]
    t = torch.rand(64, len(xs), generator=g)
    y = torch.randint(0, model.num_classes, (64,), generator=g)

    sources = [(d, i) for d, snap in zip(data, used) for i in range(len(snap.stds))]  # the order of x

    def combine(x, cast, acc=torch.float64):
        return {key: sum(d[f"p{i}.{key}"].to(cast).to(acc) * float(c) for (d, i), c in zip(sources, x))
                for key in keys}

    def output(state):
        model.load_state_dict({k: v.float() for k, v in state.items()})
        with torch.no_grad():
            return torch.cat([o.flatten(1) for o in model(xs, t, y)], 1).double()

    def rel(a, b):
        return (sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
                / sum(float(b[k].double().pow(2).sum()) for k in keys)) ** 0.5

    print(f"{len(used)} snapshots of {args.run} up to step {target.step}; relative L2 differences to the float64 sum "
          "of the float32 snapshots")
    print("| std | kernel error | sum of abs(x) | weights: float32 sum | weights: float16 | weights: bfloat16 | "
          "output: float32 sum | output: float16 | output: bfloat16 | output: std x 1.1 |")
    print("|---" * 10 + "|")
    for std in (0.03, 0.04, 0.05, 0.07, 0.10, 0.15, 0.20):
        x, error = solve_coefficients(times, gammas, target.t, std_to_exponent(std))
        wider = combine(solve_coefficients(times, gammas, target.t, std_to_exponent(std * 1.1))[0], torch.float32)
        ref = combine(x, torch.float32)
        runs = [combine(x, torch.float32, torch.float32), combine(x, torch.float16), combine(x, torch.bfloat16)]
        o = output(ref)
        cells = [f"{rel(r, ref):.1e}" for r in runs] + [f"{float((output(r) - o).norm() / o.norm()):.1e}"
                                                         for r in runs + [wider]]
        print(f"| {std:g} | {error:.2%} | {np.abs(x).sum():.1f} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("disk", "kernels"):
        p = sub.add_parser(name)
        p.add_argument("--every", type=int, default=1000)
        p.add_argument("--keep", type=int, default=24)
    p = sub.add_parser("make")
    p.add_argument("dir")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--legacy", action="store_true")
    p = sub.add_parser("precision")
    p.add_argument("run")
    args = parser.parse_args(argv)
    {"disk": disk, "kernels": kernels, "make": make, "precision": precision}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ELIT in the study: SWD at every budget against the FLOPs per image, with SiT's point beside it.

    python experiments/study/budget_curve.py --elit RUN ... --sit RUN ... --out DIR
        [--budgets 0.25 0.5 0.75 1.0] [--step 2000] [--nfe 20]

Each ELIT run's checkpoint of ``--step`` (default: the newest) is scored at every budget with the
trainer's own evaluator and the run's evaluation settings (``resample.rescore``; only
``eval_sampler.inference_budget`` changes), so the full-budget value is the one the run logged.
SiT's value is the one its run logged at the same step. FLOPs are counted on a meta-device copy
of each model (``bench.flops``): one forward on one image, and per image over the sampler's NFE.
Writes ``DIR/elit_budgets.jsonl`` (every score), ``DIR/elit_budgets.md`` and ``DIR/elit_budgets.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _final_value(run: str, metric: str, step: int | None):
    from evaluation.compare import curve, read_metrics

    xs, ys = curve(read_metrics(run), metric)
    at = xs[-1] if step is None else step
    return float(ys[list(xs).index(at)]), int(at)


def _flops(run: str, budget=None) -> float:
    from bench.flops import counted_forward_flops
    from models.registry import skeleton_model
    from training.checkpoint import list_checkpoints, load_checkpoint

    arch = load_checkpoint(list_checkpoints(run)[-1][1])["arch"]
    return float(counted_forward_flops(skeleton_model(**arch), budget))


def _pm(values) -> str:
    values = np.asarray(values, dtype=float)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.1f} ± {std:.1f}"


def main(argv=None) -> int:
    from resample import rescore

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elit", nargs="+", required=True, help="multi-budget ELIT-SiT run folders (one per seed)")
    parser.add_argument("--sit", nargs="+", required=True, help="SiT run folders (one per seed)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--metric", default="swd")
    parser.add_argument("--nfe", type=int, default=20, help="network evaluations per image of the sampler")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    records = []
    for run in args.elit:
        for budget in args.budgets:
            steps = None if args.step is None else [args.step]
            for r in rescore(run, [f"eval_sampler.inference_budget={budget}"], steps):
                records.append({"budget": budget, **r})
                print(json.dumps(records[-1]), flush=True)
    with open(os.path.join(args.out, "elit_budgets.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

    sit = [_final_value(run, args.metric, args.step) for run in args.sit]
    sit_values, step = [v for v, _ in sit], sit[0][1]
    sit_flops = _flops(args.sit[0])
    full = [r[args.metric] for r in records if r["budget"] == max(args.budgets)]
    lines = [f"ELIT-SiT (multi-budget) at step {step}: {args.metric} (x1e3, lower is better), mean ± std over "
             f"{len(args.elit)} seed(s); FLOPs counted per forward of one image (bench.flops) and per image over "
             f"{args.nfe} network evaluations", "",
             "| model | budget | MFLOPs / forward | GFLOPs / image | " + args.metric + " | vs own full budget |",
             "|---|---|---|---|---|---|"]
    points = []
    for budget in args.budgets:
        values = [r[args.metric] for r in records if r["budget"] == budget]
        flops = _flops(args.elit[0], budget)
        ratio = np.mean(values) / np.mean(full) - 1
        lines.append(f"| ELIT-SiT | {budget:g} | {flops / 1e6:.1f} | {flops * args.nfe / 1e9:.2f} | {_pm(values)} | "
                     f"{ratio * 100:+.1f} % |")
        points.append((flops * args.nfe / 1e9, np.mean(values), np.std(values, ddof=1) if len(values) > 1 else 0))
    lines.append(f"| SiT | — | {sit_flops / 1e6:.1f} | {sit_flops * args.nfe / 1e9:.2f} | {_pm(sit_values)} | |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "elit_budgets.md"), "w") as f:
        f.write(text)
    print(text)

    from evaluation.compare import _figure, _save_figure

    fig, axes = _figure(1, 1)
    ax = axes[0, 0]
    xs, ys, es = zip(*points)
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"ELIT-SiT, budgets {', '.join(f'{b:g}' for b in args.budgets)}")
    for (x, y, _), b in zip(points, args.budgets):
        ax.annotate(f"{b:g}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.errorbar([sit_flops * args.nfe / 1e9], [np.mean(sit_values)], yerr=[np.std(sit_values, ddof=1) if len(sit_values) > 1 else 0],
                marker="s", color="black", capsize=3, label="SiT")
    ax.set_xlabel(f"GFLOPs per image ({args.nfe} network evaluations)")
    ax.set_ylabel(f"{args.metric} at step {step} (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, os.path.join(args.out, "elit_budgets.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

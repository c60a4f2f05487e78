"""Mean ± std over seeds of the study's SWD curves: one PNG and one markdown table.

    python experiments/study/summarize.py --sit RUN ... --dfm RUN ... [--floor floor.json] --out DIR
        [--metric swd] [--names SiT DFM-SiT] [--group NAME RUN ... [--group ...]]

Writes ``DIR/study_<metric>.png`` (each model's mean curve with a ±1 std band, the real-vs-real
floor as a band) and ``DIR/study_<metric>.md``: the mean ± std (sample std, ddof=1) at every
evaluated step the runs share; the steps each run of the other models needs to reach the first
model's (``--sit``) final mean value, as the first evaluated step at least as good and
interpolated linearly (``evaluation.compare.steps_to_reach``), with the ratio to the first
model's step; and the step at which the first model's runs reach each other model's best mean.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from evaluation.compare import _figure, _save_figure, best, curve, read_metrics, steps_to_reach  # noqa: E402


def seed_curves(runs: Sequence[str], metric: str) -> Tuple[np.ndarray, np.ndarray]:
    """(steps, values (seeds, steps)) over the steps every run evaluated."""
    curves = [curve(read_metrics(run), metric) for run in runs]
    common = sorted(set.intersection(*[set(xs.tolist()) for xs, _ in curves]))
    if not common:
        raise ValueError(f"the runs {list(runs)} share no evaluated step of {metric!r}")
    values = np.array([[ys[list(xs).index(s)] for s in common] for xs, ys in curves])
    return np.array(common), values


def _std(values: np.ndarray) -> np.ndarray:
    return values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])


def _pm(mean: float, std: float) -> str:
    return f"{mean:.1f} ± {std:.1f}"


def floor_of(floor: dict | None, metric: str) -> dict | None:
    """floor.py's result for ``metric`` (``swd`` or a level ``swd_<res>`` from its per-level values)."""
    if not floor or metric == "swd":
        return floor
    values = [r[metric] for r in floor.get("per_level", []) if metric in r]
    if not values:
        return None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return dict(floor, mean=float(np.mean(values)), std=std)


def _crossings(models: Dict[str, Sequence[str]], data: dict) -> List[str]:
    """Steps each run needs to reach the first model's final mean value, and each model's best mean
    value reached by the first model's runs: first evaluated step at least as good, and the linear
    interpolation between that evaluation and the one before (``steps_to_reach``); the ratio is
    that step over the step at which the first model's mean curve is there."""
    names = list(models)
    ref = names[0]
    xs_r, v_r = data[ref]
    final, final_step = float(v_r.mean(axis=0)[-1]), float(xs_r[-1])
    lines = ["", f"Steps to reach {ref}'s final mean value {final:.1f} (step {final_step:.0f}); ratio = steps "
                 f"needed / {final_step:.0f}:", "",
             "| model | run | first evaluation at least as good | interpolated | ratio |", "|---|---|---|---|---|"]
    for n in names[1:]:
        xs, v = data[n]
        ratios = []
        for run, ys in zip(models[n], v):
            first = steps_to_reach(xs, ys, final)
            interp = steps_to_reach(xs, ys, final, interpolate=True)
            ratio = interp / final_step if interp is not None else None
            ratios.append(ratio)
            lines.append(f"| {n} | {os.path.basename(os.path.normpath(run))} | "
                         f"{'not reached' if first is None else f'{first:.0f}'} | "
                         f"{'—' if interp is None else f'{interp:.0f}'} | {'—' if ratio is None else f'{ratio:.2f}'} |")
        reached = [r for r in ratios if r is not None]
        if len(reached) == len(ratios):
            lines.append(f"| {n} | mean of {len(ratios)} | | | **{np.mean(reached):.2f}** |")
    lines += ["", f"Each model's best mean value, and the step at which {ref}'s runs reach it:", "",
              f"| model | best mean (step) | {ref} runs reach it at (interpolated) |", "|---|---|---|"]
    for n in names[1:]:
        xs, v = data[n]
        value, at = best(xs, v.mean(axis=0))
        steps = [steps_to_reach(xs_r, ys, value, interpolate=True) for ys in v_r]
        lines.append(f"| {n} | {value:.1f} ({at:.0f}) | "
                     + ", ".join("not reached" if s is None else f"{s:.0f}" for s in steps) + " |")
    return lines


def summarize(models: Dict[str, Sequence[str]], metric: str, floor: dict | None, out_dir: str) -> str:
    """Write the PNG and the table; returns the table text."""
    floor = floor_of(floor, metric)
    os.makedirs(out_dir, exist_ok=True)
    data = {name: seed_curves(runs, metric) for name, runs in models.items()}
    names = list(models)
    steps = sorted(set.intersection(*[set(xs.tolist()) for xs, _ in data.values()]))
    lines = [f"{metric} (x1e3, lower is better): mean ± std over seeds "
             + ", ".join(f"{n}: {len(models[n])} seeds" for n in names), "",
             "| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for s in steps:
        cells = []
        for n in names:
            xs, v = data[n]
            i = list(xs).index(s)
            cells.append(_pm(v[:, i].mean(), _std(v)[i]))
        lines.append(f"| {s:.0f} | " + " | ".join(cells) + " |")
    if floor:
        lines += ["", f"Real-vs-real floor (training crops vs held-out, {floor['num_images']} images, "
                      f"{floor['repeats']} subsets): {_pm(floor['mean'], floor['std'])}"]
    lines += _crossings(models, data)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"study_{metric}.md"), "w") as f:
        f.write(text)

    fig, axes = _figure(1, 1)
    ax = axes[0, 0]
    for n in names:
        xs, v = data[n]
        mean, std = v.mean(axis=0), _std(v)
        ax.plot(xs, mean, marker="o", markersize=3, label=f"{n} (mean of {len(v)})")
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    if floor:
        ax.axhline(floor["mean"], color="gray", linestyle="--", label="real vs real")
        ax.axhspan(floor["mean"] - floor["std"], floor["mean"] + floor["std"], color="gray", alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    if len(data) > 3:  # many models: the legend goes beside the plot, not over the curves
        fig.set_size_inches(6.5, 4.0)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend()
    _save_figure(fig, os.path.join(out_dir, f"study_{metric}.png"))
    return text


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sit", nargs="+", required=True, help="the SiT run folders (one per seed)")
    parser.add_argument("--dfm", nargs="+", required=True, help="the DFM-SiT run folders (one per seed)")
    parser.add_argument("--group", nargs="+", action="append", default=[], metavar="NAME RUN",
                        help="a further model: its name, then its run folders (repeatable)")
    parser.add_argument("--names", nargs=2, default=["SiT", "DFM-SiT"])
    parser.add_argument("--floor", default=None, help="floor.json of floor.py")
    parser.add_argument("--metric", default="swd")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    floor = json.load(open(args.floor)) if args.floor else None
    models = {args.names[0]: args.sit, args.names[1]: args.dfm}
    for group in args.group:
        if len(group) < 2:
            parser.error("--group needs a name and at least one run folder")
        models[group[0]] = group[1:]
    print(summarize(models, args.metric, floor, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training curves: ``metrics.jsonl`` of runs, run-vs-run comparison, ``convergence.png``.

``metrics.jsonl`` (in a run folder; the trainer appends one line per evaluation)::

    {"step": 20000, "images_seen": 5120000, "fdd": 512.3, "swd": 41.2, "swd_32": 50.1, "swd_16": 32.3}

one JSON object per line: ``step`` (int, optimiser steps done) and ``images_seen`` (int, training
images consumed over all ranks) are required; every other key with a number is a metric
(``fid``, ``sfid``, ``fdd``, ``swd``, ``swd_<res>``, ...; null or missing = not evaluated then).
The lines of one step are merged into one record (the trainer writes its training losses
and, at evaluation steps, the metrics as separate lines); a key written twice for a step (an
evaluation repeated after a resume) keeps the last value. A final
line without its newline (a write cut short) is ignored; any other unreadable line is an error.
:func:`plot_convergence` redraws ``convergence.png`` (the trainer's `training.logger.RunLogger` writes the records).

``python -m evaluation.compare RUN_DIR ... --metric fdd [--out plot.png] [--table table.md]``
plots the runs' curves on one PNG and prints, for every ordered pair of runs (A, B), the
steps A needs to reach B's best value: "DFM reaches SiT's best fdd (12.3 at step 400000) at
step 150000 (2.67x fewer steps)". Whether lower or higher is better comes from the metric that owns
the key (``evaluation.metric_base.lower_is_better``: higher for IS, precision, recall; lower for the
distances and for keys of no metric, such as losses). **Crossing** = the first evaluated step whose value is
at least as good as the target (``<=`` for lower-is-better); with ``--interpolate`` the step is
interpolated linearly between that evaluation and the one before it (a finer estimate when
evaluations are sparse). A run that never gets there is reported as "not reached".
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from utils.atomic import atomic_write, describe_write_error, reported_write_errors
from utils.records import parse_json
from utils.regular_files import open_regular

from .scores import lower_is_better, owner_of

METRICS_FILE = "metrics.jsonl"
X_AXES = ("step", "images_seen")


def metrics_path(run: str) -> str:
    """``run/metrics.jsonl`` for a run folder, or ``run`` itself when it is a file."""
    return run if os.path.isfile(run) else os.path.join(run, METRICS_FILE)


def read_metrics(run: str) -> List[Dict[str, object]]:
    """The records of a run's ``metrics.jsonl``, sorted by step, one per step: the records of a step
    are merged (the trainer writes its losses and its evaluation as two lines), later values win."""
    path = metrics_path(run)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file; a run folder holds {METRICS_FILE} once it has been evaluated")
    try:
        with open_regular(path, encoding="utf-8", follow_links=True) as f:  # a FIFO never hangs the reader
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text file (the byte at offset {exc.start} is not UTF-8); expected "
                         f"{METRICS_FILE}, one JSON object per line") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({describe_write_error(exc)})") from None
    lines = text.split("\n")
    by_step: Dict[int, Dict[str, object]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = parse_json(line, f"{path}:{number}")
            step, seen = record["step"], record["images_seen"]
            if not isinstance(step, int) or not isinstance(seen, int):
                raise TypeError("step and images_seen must be integers")
        except (ValueError, KeyError, TypeError) as exc:  # RecordError is a ValueError
            if number == len(lines) and not text.endswith("\n"):
                continue  # the last write was cut short
            raise ValueError(f"{path}:{number}: not a metrics record ({type(exc).__name__}: {exc}); expected "
                             f'{{"step": int, "images_seen": int, "<metric>": float, ...}}') from None
        by_step.setdefault(step, {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def curve(records: Sequence[Dict[str, object]], metric: str, x: str = "step") -> Tuple[np.ndarray, np.ndarray]:
    """``(xs, values)`` of the records that hold a finite ``metric``."""
    if x not in X_AXES:
        raise ValueError(f"x axis {x!r}: use one of {X_AXES}")
    points = [(r[x], float(r[metric])) for r in records
              if isinstance(r.get(metric), (int, float)) and math.isfinite(float(r[metric]))]
    xs = np.array([p[0] for p in points], dtype=np.float64)
    return xs, np.array([p[1] for p in points], dtype=np.float64)


def best(xs: np.ndarray, ys: np.ndarray, lower: bool = True) -> Tuple[float, float]:
    """``(value, step)`` of the best evaluation (the earliest among ties)."""
    i = int(np.argmin(ys) if lower else np.argmax(ys))
    return float(ys[i]), float(xs[i])


def steps_to_reach(xs: np.ndarray, ys: np.ndarray, target: float, lower: bool = True,
                   interpolate: bool = False) -> Optional[float]:
    """First x whose value is at least as good as ``target`` (see the module doc), or None."""
    good = ys <= target if lower else ys >= target
    if not good.any():
        return None
    i = int(np.argmax(good))
    if not interpolate or i == 0 or ys[i] == ys[i - 1]:
        return float(xs[i])
    frac = (target - ys[i - 1]) / (ys[i] - ys[i - 1])
    return float(xs[i - 1] + frac * (xs[i] - xs[i - 1]))


@dataclass
class Crossing:
    run: str          # the run that has to get there
    target_run: str   # the run whose best value is the target
    target: float
    target_step: float
    reached_at: Optional[float]

    @property
    def speedup(self) -> Optional[float]:
        return self.target_step / self.reached_at if self.reached_at else None


def crossing_table(curves: Dict[str, Tuple[np.ndarray, np.ndarray]], metric: str,
                   interpolate: bool = False) -> List[Crossing]:
    """For every ordered pair of runs (A, B), A's steps to reach B's best ``metric``."""
    lower = lower_is_better(metric)
    rows = []
    for target_run, (bx, by) in curves.items():
        if len(by) == 0:
            continue
        target, target_step = best(bx, by, lower)
        for run, (xs, ys) in curves.items():
            if run != target_run:
                rows.append(Crossing(run, target_run, target, target_step,
                                     steps_to_reach(xs, ys, target, lower, interpolate) if len(ys) else None))
    return rows


def _fmt_step(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def format_table(rows: List[Crossing], metric: str, x: str = "step") -> str:
    """A markdown table and one sentence per row."""
    lines = [f"| run | reaches | best {metric} of | at {x} | {x} needed | speed-up |", "|---|---|---|---|---|---|"]
    for r in rows:
        needed = _fmt_step(r.reached_at) if r.reached_at is not None else "not reached"
        speed = f"{r.speedup:.2f}x" if r.speedup else "-"
        lines.append(f"| {r.run} | {r.target:.4g} | {r.target_run} | {_fmt_step(r.target_step)} | {needed} | {speed} |")
    lines.append("")
    for r in rows:
        head = f"{r.run} reaches {r.target_run}'s best {metric} ({r.target:.4g} at {x} {_fmt_step(r.target_step)})"
        lines.append(f"{head} at {x} {_fmt_step(r.reached_at)} ({r.speedup:.2f}x)." if r.reached_at is not None
                     else f"{head}: not reached.")
    return "\n".join(lines)


def _save_figure(fig, out: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_write(out, "wb") as f:
        f.write(buf.getvalue())
    return out


def _figure(rows: int, cols: int):
    """A matplotlib Figure with its own Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * cols, 3.6 * rows))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def plot_runs(curves: Dict[str, Tuple[np.ndarray, np.ndarray]], metric: str, out: str, x: str = "step") -> str:
    """One PNG with every run's ``metric`` against ``x``; returns ``out``."""
    fig, axes = _figure(1, 1)
    ax = axes[0, 0]
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_figure(fig, out)


def plot_convergence(run: str, out: Optional[str] = None, metrics: Optional[Sequence[str]] = None) -> Optional[str]:
    """Draw ``convergence.png`` of one run: each metric against step (left) and images seen (right).

    ``run`` is the run folder (or its ``metrics.jsonl``); ``out`` defaults to
    ``<run>/convergence.png``; ``metrics`` defaults to every key in the file that is a metric's
    headline value (its first table column; not SWD's per-level ``swd_<res>`` or KID's std) or
    belongs to no metric (losses). Returns the path, or None when there is nothing to plot yet.
    """
    records = read_metrics(run)
    if metrics is None:
        keys = {k for r in records for k, v in r.items() if isinstance(v, (int, float))}
        metrics = sorted(k for k in keys - set(X_AXES)
                         if owner_of(k) is None or k in {c.key for c in owner_of(k).columns})
    metrics = [m for m in metrics if len(curve(records, m)[0])]
    if not metrics:
        return None
    out = out or os.path.join(run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run)), "convergence.png")
    fig, axes = _figure(len(metrics), 2)
    for row, metric in enumerate(metrics):
        for col, x in enumerate(X_AXES):
            xs, ys = curve(records, metric, x)
            ax = axes[row, col]
            ax.plot(xs, ys, marker="o", markersize=3)
            ax.set_xlabel(x)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    return _save_figure(fig, out)


def run_names(runs: Sequence[str]) -> List[str]:
    """Folder names of the runs, made unique with the parent folder where two are equal."""
    names = [os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(os.path.abspath(r))))
             for r in runs]
    if len(set(names)) < len(names):
        names = [os.path.relpath(os.path.abspath(r)) for r in runs]
    return names


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.compare",
                                     description="Compare the metrics.jsonl curves of training runs.")
    parser.add_argument("runs", nargs="+", help="run folders (or their metrics.jsonl files)")
    parser.add_argument("--metric", required=True, help="metric key, e.g. fdd, fid, swd")
    parser.add_argument("--x", default="step", choices=X_AXES, help="x axis of the plot and the table (default step)")
    parser.add_argument("--out", default=None, metavar="PLOT.png", help="the file to write: the plot")
    parser.add_argument("--table", default=None, metavar="PATH", help="also write the table (.md, or .json)")
    parser.add_argument("--interpolate", action="store_true",
                        help="interpolate crossings linearly between evaluations (default: first evaluated step)")
    args = parser.parse_args(argv)
    try:
        curves = {}
        for name, run in zip(run_names(args.runs), args.runs):
            curves[name] = curve(read_metrics(run), args.metric, args.x)
            if not len(curves[name][0]):
                raise ValueError(f"{metrics_path(run)}: no value of {args.metric!r}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = crossing_table(curves, args.metric, args.interpolate)
    text = format_table(rows, args.metric, args.x)
    print(text)
    try:
        if args.table:
            with reported_write_errors(args.table, ValueError), atomic_write(args.table, "w") as f:
                if args.table.endswith(".json"):
                    json.dump([dict(vars(r), speedup=r.speedup) for r in rows], f, indent=2)
                else:
                    f.write(text + "\n")
        if args.out:
            with reported_write_errors(args.out, ValueError):
                print(f"wrote {plot_runs(curves, args.metric, args.out, args.x)}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

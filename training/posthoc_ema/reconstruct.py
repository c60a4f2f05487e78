"""Reconstructing the EMA of any std from a run's snapshots (``python -m training.posthoc_ema``).

The reconstruction is ``sum_i x_i snapshot_i`` (the coefficients from training.posthoc_ema.kernels),
computed as a running float32 sum: each snapshot file is opened, read tensor by tensor into the sums
of every requested std, and closed before the next one, so memory holds the outputs and one tensor,
whatever the number of snapshots. Which snapshots it reads, and what it checks in them first:
training.posthoc_ema.snapshots.select_snapshots and snapshot_file.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional, Sequence

import torch

from models.finite import first_nonfinite
from training.posthoc_ema.kernels import (MAX_KERNEL_ERROR, MAX_STD, MIN_STD, reachable_stds, solve_coefficients, std_problem,
                                          std_to_exponent)
from training.posthoc_ema.snapshot_file import Snapshot, SnapshotError, SnapshotFile
from training.posthoc_ema.snapshots import FOLDER, select_snapshots


class PosthocError(ValueError):
    """A reconstruction that cannot be made (one line)."""


def output_path(folder: str, step: int, std: float) -> str:
    """`<folder>/<step>-std<std>.safetensors`, the std written in the fewest digits that read back as
    the same float (two different stds never share a file)."""
    return os.path.join(folder, f"{step:07d}-std{float(std)!r}.safetensors")


def _kernels(used: List[Snapshot]) -> tuple:
    """(times, exponents) of every stored profile of every snapshot, in the order of their tensors."""
    return [s.t for s in used for _ in s.stds], [std_to_exponent(std) for s in used for std in s.stds]


def _plan(used: List[Snapshot], stds: Sequence[float]) -> list:
    """[(std, coefficients, kernel error)]; PosthocError for a std the snapshots cannot reach."""
    target, plans = used[-1], []
    times, gammas = _kernels(used)
    for std in stds:
        try:
            x, error = solve_coefficients(times, gammas, target.t, std_to_exponent(std))
        except ValueError as e:
            raise PosthocError(f"--std {std}: {e}") from None
        if error > MAX_KERNEL_ERROR:
            lo, hi = reachable_stds(times, gammas, target.t)
            reach = f"{lo:.3g} to {hi:.3g}" if lo is not None else "none"
            raise PosthocError(f"--std {std}: the stored profiles ({target.stds}, {len(used)} snapshots up to step "
                               f"{target.step}) reconstruct it only with a {error:.0%} kernel error (at most "
                               f"{MAX_KERNEL_ERROR:.0%}); reachable here: {reach}")
        plans.append((std, x, error))
    return plans


def _combine(used: List[Snapshot], plans: list) -> List[dict]:
    """Every plan's weights (float32; integer tensors from the target snapshot), one snapshot at a time.
    The sums are checked for finiteness once at the end (any non-finite weight of any snapshot makes
    them non-finite; checking every tensor read took a third of the time): then the damaged snapshot is
    looked for and named."""
    target = used[-1]
    keys = target.keys()
    floating = {k: target.tensors[f"p0.{k}"][0].is_floating_point for k in keys}
    outs = [{k: torch.zeros(target.tensors[f"p0.{k}"][1]) for k in keys if floating[k]} for _ in plans]
    column = 0
    for snap in used:
        with SnapshotFile(snap) as f:
            for key in keys:
                if not floating[key]:
                    if snap is target:
                        value = f.tensor(f"p0.{key}")
                        for out in outs:
                            out[key] = value.clone()
                    continue
                for i in range(len(snap.stds)):
                    value = f.tensor(f"p{i}.{key}", check=False)
                    for out, (_, x, _) in zip(outs, plans):
                        out[key].add_(value, alpha=float(x[column + i]))
        column += len(snap.stds)
    for out, (std, _, _) in zip(outs, plans):
        bad = first_nonfinite(out)
        if bad is not None:
            _find_nonfinite(used, keys)
            raise PosthocError(f"the reconstruction of std {std} is not finite ({bad}): its coefficients overflow "
                               "float32 with these weights; choose a std nearer the stored profiles")
    return outs


def _find_nonfinite(used: List[Snapshot], keys: List[str]) -> None:
    """SnapshotError naming the first snapshot that holds a non-finite floating weight, if one does."""
    for snap in used:
        with SnapshotFile(snap) as f:
            for key in keys:
                for i in range(len(snap.stds)):
                    f.tensor(f"p{i}.{key}")


def reconstruct(run: str, stds: Sequence[float], step: Optional[int] = None, out: Optional[str] = None,
                run_id: Optional[str] = None, note: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Write the post-hoc EMA of every std in `stds` at snapshot step `step` (default: the run's last)
    from the snapshots of run `run_id` (default: the one started last in the folder); returns one record
    per std (path, kernel error, coefficients). Nothing is written unless every std can be reconstructed
    (PosthocError: one line). `note(line)` hears what was left out (other runs' snapshots, look-alikes)."""
    from models.weights_io import export_weights

    wanted = []
    for std in stds:
        if std_problem(std):
            raise PosthocError(f"--std {std}: a power-function EMA has a relative std in [{MIN_STD}, {MAX_STD}]")
        wanted += [float(std)] if float(std) not in wanted else []
    try:
        selection = select_snapshots(run, run_id, step)
        used, target = selection.used, selection.target
        plans = _plan(used, wanted)
        weights = _combine(used, plans)
    except SnapshotError as e:
        raise PosthocError(str(e)) from None
    for line in selection.notes:
        (note or (lambda _: None))(line)
    folder = out or os.path.join(run, FOLDER, "reconstructed")
    records = []
    for (std, x, error), state in zip(plans, weights):
        path = output_path(folder, target.step, std)
        info = {"kind": "posthoc_ema", "std": std, "step": target.step, "t": target.t, "run": target.run,
                "profiles": target.stds, "snapshots": len(used), "kernel_error": error}
        export_weights(path, {"ema": state}, arch=target.arch, config=target.config, steps=target.step,
                       weights_info=info)
        records.append({"path": path, **info, "coefficients": [float(v) for v in x]})
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    from training.posthoc_ema import __doc__ as overview

    parser = argparse.ArgumentParser(prog="python -m training.posthoc_ema", description=overview.split("\n\n")[0])
    parser.add_argument("run", help="the experiment folder (it holds posthoc_ema/<step>.safetensors)")
    parser.add_argument("--std", type=float, nargs="+", required=True, help="relative stds to reconstruct")
    parser.add_argument("--step", type=int, default=None, help="the snapshot step (default: the run's last)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/posthoc_ema/reconstructed)")
    parser.add_argument("--run", dest="run_id", default=None,
                        help="the run identity whose snapshots to use (default: the run started last in RUN)")
    args = parser.parse_args(argv)
    try:
        records = reconstruct(args.run, args.std, args.step, args.out, args.run_id,
                              note=lambda line: print(f"posthoc_ema: note: {line}", file=sys.stderr))
    except PosthocError as error:
        print(f"posthoc_ema: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        from utils.atomic import describe_write_error

        print(f"posthoc_ema: error: cannot write the reconstruction: {describe_write_error(error)}", file=sys.stderr)
        return 1
    for r in records:
        print(f"std {r['std']:g} at step {r['step']}: {r['path']} (kernel error {r['kernel_error']:.2%}, "
              f"{r['snapshots']} snapshots)")
    return 0

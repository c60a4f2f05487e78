r"""Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
2024, section 3): choose the EMA length after training.

Training keeps power-function EMA profiles of the weights (``posthoc_ema.stds``, e.g. ``[0.05,
0.10]``: relative standard deviations of the averaging kernel) and stores a snapshot of every
profile every ``posthoc_ema.every`` steps (weights only, ``.safetensors``, in ``<run>/posthoc_ema/``).
Afterwards

    python -m training.posthoc_ema RUN --std 0.02 0.04 0.08 [--step N] [--out DIR]

reconstructs the EMA of any std (at the last snapshot, or step N) as the least-squares
combination of the stored snapshots, and writes weights that generate.py, the evaluator and the
budget sweep read like any checkpoint (``<run>/posthoc_ema/reconstructed/<step>-std<std>.safetensors``).

The maths. A power-function EMA with exponent gamma averages the weights theta(tau) seen up to
time t with the kernel ``p(tau; t) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on [0, t]; its
relative std ``sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))`` (so gamma is the largest
real root of ``g^3 + 7 g^2 + (16 - sigma^-2) g + (12 - sigma^-2)``). In steps it is the update
``ema <- beta_t ema + (1 - beta_t) theta`` with ``beta_t = (1 - 1/t)^(gamma + 1)`` at update t
(t = 1, 2, ...). Snapshots (t_i, gamma_i) span kernels p_i; the target (t_r, gamma_r) is matched
in L2 over tau: ``A x = b`` with ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_r>``, and
``<p_a, p_b> = (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1))``,
``m = min(t_a, t_b)`` (computed in logarithms). The reconstruction is ``sum_i x_i snapshot_i``; the
relative L2 error of its kernel, ``|sum x_i p_i - p_r| / |p_r|``, says how well the stored profiles
can reach a std, and a std they cannot reach within ``MAX_KERNEL_ERROR`` is refused.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

from training.ema import EMA, create_ema
from training.errors import ConfigError
from utils.config import option_help as _help

FOLDER = "posthoc_ema"
SNAPSHOT = re.compile(r"^(\d{7,})\.safetensors$")
MAX_STD = 0.28  # gamma = 0 gives 0.2887; beyond that the kernel is no power function
MAX_KERNEL_ERROR = 0.05  # relative L2 error of a reconstructed averaging kernel


@dataclass
class PosthocEMAConfig:
    stds: List[float] = field(default_factory=list, metadata=_help(
        "relative stds of the power-function EMA profiles to keep, e.g. [0.05, 0.10] (EDM2's); [] = none"))
    every: int = field(default=1000, metadata=_help("store a snapshot of every profile every N steps"))


def check_posthoc_keys(cfg) -> None:
    p = cfg.posthoc_ema
    stds = list(p.stds or [])
    if any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= MAX_STD for s in stds) \
            or len(set(stds)) < len(stds):
        raise ConfigError(f"posthoc_ema.stds must be distinct numbers in (0, {MAX_STD}], got {stds}")
    if isinstance(p.every, bool) or not isinstance(p.every, int) or p.every < 1:
        raise ConfigError(f"posthoc_ema.every must be an integer >= 1, got {p.every!r}")
    p.stds = [float(s) for s in stds]


# ------------------------------------------------------------------ the maths
def std_to_exponent(std: float) -> float:
    """gamma of a power-function EMA with relative std ``std`` (0 < std <= MAX_STD)."""
    inv = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def exponent_to_std(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def kernel_dot(t_a, g_a, t_b, g_b) -> np.ndarray:
    """<p_a, p_b> of power kernels (arrays broadcast), in float64 through logarithms."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    m = np.minimum(t_a, t_b)
    log = (np.log(g_a + 1) + np.log(g_b + 1) + (g_a + g_b + 1) * np.log(m) - np.log(g_a + g_b + 1)
           - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return np.exp(log)


def solve_coefficients(times: Sequence[float], gammas: Sequence[float], t_target: float, g_target: float):
    """(x, relative kernel error) of the least-squares reconstruction of (t_target, g_target)."""
    t, g = np.asarray(times, np.float64), np.asarray(gammas, np.float64)
    A = kernel_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = kernel_dot(t, g, t_target, g_target)
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    target = float(kernel_dot(t_target, g_target, t_target, g_target))
    residual = max(target - 2 * float(x @ b) + float(x @ A @ x), 0.0)
    return x, math.sqrt(residual / target)


# ------------------------------------------------------------------ training
class PowerEMA:
    """The power-function EMA profiles of a training run (fp32 copies of the model, like the EMA);
    `update(skip)` once per optimizer step (`training.step.TrainStep`), `snapshot` every `every`."""

    def __init__(self, model: torch.nn.Module, stds: Sequence[float], every: int):
        self.stds = [float(s) for s in stds]
        self.gammas = [std_to_exponent(s) for s in self.stds]
        self.every = int(every)
        self.models = [create_ema(model) for _ in self.stds]
        self.averages = [EMA(model, copy, 0.0) for copy in self.models]
        self.t = 0  # optimizer steps averaged so far

    def update(self, skip: Optional[torch.Tensor] = None) -> None:
        self.t += 1
        for gamma, average in zip(self.gammas, self.averages):
            average.lerp(1.0 - (1.0 - 1.0 / self.t) ** (gamma + 1), skip)

    def state_dict(self) -> dict:
        return {"stds": list(self.stds), "t": self.t, "profiles": [m.state_dict() for m in self.models]}

    def load_state_dict(self, state: Optional[dict], path: str) -> None:
        """The profiles of a resumed run (ConfigError when they do not fit this run's stds)."""
        if not isinstance(state, dict) or [float(s) for s in state.get("stds", [])] != self.stds:
            stored = state.get("stds") if isinstance(state, dict) else None
            raise ConfigError(f"resume: posthoc_ema.stds={self.stds}, but checkpoint {path} holds the profiles of "
                              f"{stored}; a profile cannot be started in the middle of a run (resume with the "
                              "checkpoint's stds, or start a new experiment)")
        try:
            for model, profile in zip(self.models, state["profiles"]):
                model.load_state_dict(profile)
            self.t = int(state["t"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise ConfigError(f"resume: checkpoint {path}: its post-hoc EMA profiles do not fit this model "
                              f"({str(e).splitlines()[0][:160]}); the file is damaged or was edited") from None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def snapshot(self, exp_dir: str, step: int, arch: dict, config: dict) -> str:
        """Write `<exp_dir>/posthoc_ema/<step>.safetensors`: every profile's weights (groups p0, p1,
        ...), their stds and t in the header."""
        from models.weights_io import export_weights

        path = snapshot_path(exp_dir, step)
        export_weights(path, {f"p{i}": m.state_dict() for i, m in enumerate(self.models)}, arch=arch, config=config,
                       steps=step, weights_info={"kind": "posthoc_ema_snapshot", "stds": self.stds, "t": self.t})
        return path


def snapshot_path(exp_dir: str, step: int) -> str:
    return os.path.join(exp_dir, FOLDER, f"{step:07d}.safetensors")


# ------------------------------------------------------------------ reconstruction
class PosthocError(ValueError):
    """A reconstruction that cannot be made (one line)."""


@dataclass
class Snapshot:
    path: str
    step: int
    t: int
    stds: List[float]


def list_snapshots(run: str) -> List[Snapshot]:
    """The snapshots of a run folder, oldest first (PosthocError for none, or a damaged one)."""
    from safetensors import safe_open

    from models.weights_io import header_fields

    folder = os.path.join(run, FOLDER)
    paths = sorted(p for p in glob.glob(os.path.join(folder, "*.safetensors")) if SNAPSHOT.match(os.path.basename(p)))
    if not paths:
        raise PosthocError(f"{run} holds no post-hoc EMA snapshots ({folder}/<step>.safetensors): train with "
                           "posthoc_ema.stds (e.g. [0.05, 0.10]) to keep them")
    found = []
    for path in paths:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                info = header_fields(f.metadata() or {}).get("weights_info")
            found.append(Snapshot(path, int(SNAPSHOT.match(os.path.basename(path)).group(1)), int(info["t"]),
                                  [float(s) for s in info["stds"]]))
        except Exception as e:  # noqa: BLE001 - safetensors and json fail in many ways
            raise PosthocError(f"post-hoc EMA snapshot {path} is damaged ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:120] if str(e) else 'unreadable'}); delete it (the others "
                               "still reconstruct) or copy it again") from None
    return found


def _kernels(snapshots: List[Snapshot]) -> tuple:
    """(times, exponents) of every stored profile of every snapshot, in the order of their tensors."""
    return [s.t for s in snapshots for _ in s.stds], [std_to_exponent(std) for s in snapshots for std in s.stds]


def reachable_stds(snapshots: List[Snapshot], t_target: float) -> tuple:
    """(lowest, highest) std the snapshots reconstruct within MAX_KERNEL_ERROR at t_target."""
    times, gammas = _kernels(snapshots)
    ok = [std for std in np.geomspace(0.005, MAX_STD, 120)
          if solve_coefficients(times, gammas, t_target, std_to_exponent(std))[1] <= MAX_KERNEL_ERROR]
    return (float(min(ok)), float(max(ok))) if ok else (None, None)


def reconstruct(run: str, stds: Sequence[float], step: Optional[int] = None, out: Optional[str] = None) -> List[dict]:
    """Write the post-hoc EMA of every std in `stds` at snapshot step `step` (default: the last);
    returns one record per std (path, kernel error, coefficients). Nothing is written unless every
    std can be reconstructed (PosthocError: one line)."""
    from safetensors import safe_open

    snapshots = list_snapshots(run)
    step = snapshots[-1].step if step is None else int(step)
    used = [s for s in snapshots if s.step <= step]
    if not used or used[-1].step != step:
        raise PosthocError(f"{run} has no post-hoc EMA snapshot at step {step}; snapshots: "
                           f"{', '.join(str(s.step) for s in snapshots)}")
    t_target = used[-1].t
    times, gammas = _kernels(used)
    plans = []
    for std in stds:
        if not 0 < std <= MAX_STD:
            raise PosthocError(f"--std {std}: a power-function EMA has a relative std in (0, {MAX_STD}]")
        x, error = solve_coefficients(times, gammas, t_target, std_to_exponent(std))
        if error > MAX_KERNEL_ERROR:
            lo, hi = reachable_stds(used, t_target)
            reach = f"{lo:.3g} to {hi:.3g}" if lo is not None else "none"
            raise PosthocError(f"--std {std}: the stored profiles ({used[-1].stds}, {len(used)} snapshots up to "
                               f"step {step}) reconstruct it only with a {error:.0%} kernel error (at most "
                               f"{MAX_KERNEL_ERROR:.0%}); reachable here: {reach}")
        plans.append((std, x, error))
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(s.path, framework="pt", device="cpu")) for s in used]
        return _combine(run, handles, used, plans, step, t_target, out)


def _combine(run, handles, used, plans, step, t_target, out) -> List[dict]:
    """Every std's reconstruction, reading each stored tensor once (for all stds), then written."""
    from models.weights_io import export_weights, header_fields

    last = header_fields(handles[-1].metadata() or {})
    sources = [(handle, p) for handle, snap in zip(handles, used) for p in range(len(snap.stds))]
    try:
        keys = [k[len("p0."):] for k in handles[-1].keys() if k.startswith("p0.")]
        weights = [{} for _ in plans]
        for key in keys:
            tensors = [handle.get_tensor(f"p{p}.{key}") for handle, p in sources]
            for out_weights, (_, x, _) in zip(weights, plans):
                acc = sum(t.to(torch.float64) * float(c) for t, c in zip(tensors, x))
                out_weights[key] = acc.to(tensors[-1].dtype)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - a tensor missing or unreadable in a snapshot
        raise PosthocError(f"the post-hoc EMA snapshots of {run} do not hold the same readable tensors "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); a snapshot is "
                           "damaged or from another run") from None
    folder = out or os.path.join(run, FOLDER, "reconstructed")
    records = []
    for (std, x, error), state in zip(plans, weights):
        path = os.path.join(folder, f"{step:07d}-std{std:.4g}.safetensors")
        info = {"kind": "posthoc_ema", "std": float(std), "step": step, "t": t_target,
                "profiles": used[-1].stds, "snapshots": len(used), "kernel_error": error}
        export_weights(path, {"ema": state}, arch=last.get("arch"), config=last.get("config"), steps=step,
                       weights_info=info)
        records.append({"path": path, **info, "coefficients": [float(v) for v in x]})
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.posthoc_ema", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the experiment folder (it holds posthoc_ema/<step>.safetensors)")
    parser.add_argument("--std", type=float, nargs="+", required=True, help="relative stds to reconstruct")
    parser.add_argument("--step", type=int, default=None, help="the snapshot step (default: the last)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/posthoc_ema/reconstructed)")
    args = parser.parse_args(argv)
    try:
        records = reconstruct(args.run, args.std, args.step, args.out)
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


if __name__ == "__main__":
    sys.exit(main())



"""The training side of post-hoc EMA: the power-function EMA profiles of a run, their config keys, their
state in the checkpoint (checked on resume) and their snapshots."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from models.finite import first_nonfinite
from training.ema import EMA, create_ema
from training.errors import ConfigError
from training.posthoc_ema.kernels import MAX_STD, MIN_STD, std_problem, std_to_exponent
from training.posthoc_ema.snapshot_file import RUN_ID
from training.posthoc_ema.snapshots import STORE_DTYPES, SnapshotStore, new_run_identity
from utils.config import option_help as _help


@dataclass
class PosthocEMAConfig:
    stds: List[float] = field(default_factory=list, metadata=_help(
        "relative stds of the power-function EMA profiles to keep, e.g. [0.05, 0.10] (EDM2's); [] = none"))
    every: int = field(default=1000, metadata=_help("store a snapshot of every profile every N steps (and at the "
                                                    "last step)"))
    keep: int = field(default=24, metadata=_help(
        "thin older snapshots to about this many evenly spaced over the run plus the newest ones (docs/TRAINING.md "
        "'Post-hoc EMA'); 0 = keep every snapshot"))
    dtype: str = field(default="float16", metadata=_help("snapshot precision: float16 (half the disk) or float32"))


def check_posthoc_keys(cfg) -> None:
    p = cfg.posthoc_ema
    stds = list(p.stds or [])
    if any(std_problem(s) for s in stds) or len(set(stds)) < len(stds):
        raise ConfigError(f"posthoc_ema.stds must be distinct numbers in [{MIN_STD}, {MAX_STD}], got {stds}")
    for key, low in (("every", 1), ("keep", 0)):
        value = p[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"posthoc_ema.{key} must be an integer >= {low}, got {value!r}")
    if p.dtype not in STORE_DTYPES:
        raise ConfigError(f"posthoc_ema.dtype must be one of {sorted(STORE_DTYPES)}, got {p.dtype!r}")
    p.stds = [float(s) for s in stds]


def start_profiles(cfg, model: torch.nn.Module, exp_dir: str, ckpt: Optional[dict], resume_path: Optional[str],
                   log, is_main: bool) -> Optional["PowerEMA"]:
    """The run's profiles (None without `posthoc_ema.stds`), restored from `ckpt` when resuming; on rank 0
    the snapshot folder is readied (a warning line when it holds other runs' snapshots)."""
    p = cfg.posthoc_ema
    if not p.stds:
        return None
    profiles = PowerEMA(model, p.stds, p.every, keep=p.keep, dtype=p.dtype, final_step=cfg.max_train_steps)
    if ckpt is not None:
        profiles.load_state_dict(ckpt.get("posthoc_ema"), resume_path, ckpt["steps"])
    if is_main:
        line = profiles.store(exp_dir).start()
        if line:
            log.warning(line)
    return profiles


def _squared_norm(state: dict) -> float:
    """Sum of squares of a state dict's floating tensors (float64): the fingerprint of a profile."""
    return float(sum(torch.linalg.vector_norm(v, dtype=torch.float64) ** 2 for v in state.values()
                     if v.is_floating_point()))


class PowerEMA:
    """The power-function EMA profiles of a training run (fp32 copies of the model, like the EMA);
    `update(skip)` once per optimizer step (`training.step.TrainStep`), `snapshot` when `due`.

    `run` is the run's identity, made here and kept in the checkpoint; each process makes one, and
    rank 0's is the one its snapshots and checkpoints carry."""

    def __init__(self, model: torch.nn.Module, stds: Sequence[float], every: int, *, keep: int, dtype: str,
                 final_step: Optional[int] = None):
        self.stds = [float(s) for s in stds]
        self.gammas = [std_to_exponent(s) for s in self.stds]
        self.every, self.keep, self.dtype, self.final_step = int(every), int(keep), dtype, final_step
        self.models = [create_ema(model) for _ in self.stds]
        self.averages = [EMA(model, copy, 0.0) for copy in self.models]
        self.t = 0  # optimizer steps averaged so far
        self.run = new_run_identity()
        self.legacy_upto: Optional[int] = None  # resumed from an older version: its snapshots up to here

    def update(self, skip: Optional[torch.Tensor] = None) -> None:
        self.t += 1
        for gamma, average in zip(self.gammas, self.averages):
            average.lerp(1.0 - (1.0 - 1.0 / self.t) ** (gamma + 1), skip)

    def state_dict(self) -> dict:
        profiles = [m.state_dict() for m in self.models]
        return {"stds": list(self.stds), "t": self.t, "profiles": profiles, "run": self.run,
                "legacy_upto": self.legacy_upto, "norms": [_squared_norm(p) for p in profiles]}

    def load_state_dict(self, state: Optional[dict], path: str, steps: int) -> None:
        """The profiles of a run resumed from checkpoint `path` of step `steps`: ConfigError (one line)
        when they do not fit this run's stds or the checkpoint's own fields."""
        if not isinstance(state, dict) or not isinstance(state.get("stds"), list) or state["stds"] != self.stds:
            stored = state.get("stds") if isinstance(state, dict) else None
            raise ConfigError(f"resume: posthoc_ema.stds={self.stds}, but checkpoint {path} holds the profiles of "
                              f"{str(stored)[:80]}; a profile cannot be started in the middle of a run (resume with "
                              "the checkpoint's stds, or start a new experiment)")

        def damaged(why: str) -> ConfigError:
            return ConfigError(f"resume: checkpoint {path}: its post-hoc EMA profiles {why}; the file is damaged or "
                               "was edited")

        profiles, t, run = state.get("profiles"), state.get("t"), state.get("run")
        upto, norms = state.get("legacy_upto"), state.get("norms")
        if not isinstance(profiles, list) or len(profiles) != len(self.stds):
            raise damaged(f"are {len(profiles) if isinstance(profiles, list) else str(profiles)[:40]} for "
                          f"{len(self.stds)} stds")
        if isinstance(t, bool) or not isinstance(t, int) or t != steps:
            raise damaged(f"have averaged t={str(t)[:40]} steps, but the checkpoint is at step {steps}")
        if run is not None and not (isinstance(run, str) and RUN_ID.match(run)):
            raise damaged(f"name no valid run identity ({str(run)[:80]!r})")
        if upto is not None and (isinstance(upto, bool) or not isinstance(upto, int) or not 0 <= upto <= steps):
            raise damaged(f"hold legacy_upto={str(upto)[:40]}, not a step in [0, {steps}]")
        if norms is not None and (not isinstance(norms, list) or len(norms) != len(self.stds)
                                  or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in norms)):
            raise damaged(f"hold norms {str(norms)[:80]}, not one number per std")
        try:
            for model, profile in zip(self.models, profiles):
                model.load_state_dict(profile)
        except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as e:
            raise damaged(f"do not fit this model ({str(e).splitlines()[0][:160]})") from None
        for i, (std, model) in enumerate(zip(self.stds, self.models)):
            state_i = model.state_dict()
            bad = first_nonfinite(state_i)
            if bad is not None:
                raise damaged(f"hold non-finite weights (std {std}) in {bad!r}")
            if norms is not None and not math.isclose(_squared_norm(state_i), norms[i], rel_tol=1e-6):
                raise damaged(f"are out of order or altered: profile {i} is not the std {std} profile stored "
                              "with it (its norm differs)")
        self.t = t
        self.run = run if run is not None else self.run
        # a checkpoint of an earlier version: its snapshots up to this step carry no identity; adopt them
        self.legacy_upto = upto if run is not None else steps

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.final_step

    def store(self, exp_dir: str) -> SnapshotStore:
        return SnapshotStore(exp_dir, self.run, self.legacy_upto, self.every, self.keep, self.dtype)

    def snapshot(self, exp_dir: str, step: int, arch: dict, config: dict) -> str:
        """Write `<exp_dir>/posthoc_ema/<step>.safetensors` (every profile's weights, groups p0, p1, ...;
        the run, stds and t in the header) and thin the older snapshots."""
        return self.store(exp_dir).write(step, [m.state_dict() for m in self.models], self.stds, self.t, arch, config)

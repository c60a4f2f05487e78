"""The experiment folder of a training run: created once, its log, and every version of its config.

`<output_dir>/<exp_name>/` holds `log.txt`, `config.yaml` (the config of the latest start),
`configs/` (the config of every start that changed it, named by the step it started from),
`checkpoints/`, `metrics.jsonl`, previews and the rest. Rank 0 writes; the other ranks learn of
an error through a collective and stop with the same line.

Resuming with other settings than the checkpoint's run is allowed for everything but the
architecture (an error in `training.setup`): the change is logged as one warning line naming
each key (old -> new), and the earlier config stays in `configs/`.
"""
from __future__ import annotations

import errno
import os

from omegaconf import OmegaConf

from training.errors import CheckpointWriteError, ConfigError, describe_write_error
from training.logger import setup_file_logger
from utils.config import config_to_dict, save_config

CONFIGS = "configs"
# keys whose change on resume says nothing about the run (paths of the run itself, workers, logging)
NOT_COMPARED = ("resume", "cpu_threads", "num_workers", "output_dir", "exp_name", "report_to", "wandb_project",
                "wandb_mode", "make_demo_data")


def open_run_folder(cfg, exp_dir: str, accelerator, gather):
    """The run's logger. Rank 0 creates `exp_dir` with log.txt; a folder that cannot be created or
    written ends the run on every rank with one line: ConfigError naming `output_dir` / `exp_name`
    (a file in the way, no permission, a read-only file system, a name too long),
    CheckpointWriteError for a full disk or quota. `gather(obj)`: the objects of every rank."""
    error = None
    if not accelerator.is_main_process:
        log = setup_file_logger(None, False)
    else:
        try:
            log = setup_file_logger(exp_dir, True)
        except OSError as e:
            log, error = setup_file_logger(None, True), run_folder_error(cfg, exp_dir, e)
    error = next((e for e in gather(error) if e is not None), None)
    if error is not None:
        raise error
    return log


def flat(config: dict, prefix: str = "") -> dict:
    """{"preview.method": "euler", ...}: nested dicts flattened to dotted keys (lists stay values)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key not in ("model_overrides", "encoder_overrides", "time_distribution",
                                                   "decomposition", "method"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict, new: dict) -> list:
    """["key: old -> new", ...] between two run configs (plain dicts), for the keys that matter;
    `weighting` in configs written before `time_distribution` counts as the same key."""
    old = dict(old)
    if "weighting" in old and "time_distribution" not in old:
        old["time_distribution"] = old.pop("weighting")
    a, b = flat(old), flat(new)
    keys = [k for k in sorted(set(a) | set(b)) if k.split(".")[0] not in NOT_COMPARED]
    return [f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}" for k in keys if a.get(k) != b.get(k)]


def _short(value) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def record_config(cfg, exp_dir: str, start_step: int, previous: dict | None, log, is_main: bool, gather) -> None:
    """Write the config this start trains with: `config.yaml` and `configs/<start_step>.yaml` (an
    earlier version of that name is kept with a suffix, so no version is lost). `previous`: the run
    config stored in the checkpoint being resumed (None for a fresh run); its differences are
    logged as one warning line."""
    config = config_to_dict(cfg)
    if previous is not None:
        changes = config_changes(previous, config)
        if changes:
            log.warning(f"WARNING: resuming at step {start_step} with settings that differ from the checkpoint's run: "
                        + "; ".join(changes) + f" (the earlier config is kept in {os.path.join(exp_dir, CONFIGS)})")
    error = _write_config_versions(cfg, config, exp_dir, start_step, previous) if is_main else None
    error = next((e for e in gather(error) if e is not None), None)
    if error is not None:
        raise error


def _write_config_versions(cfg, config: dict, exp_dir: str, start_step: int, previous):
    folder = os.path.join(exp_dir, CONFIGS)
    path = target = os.path.join(folder, f"{start_step:07d}.yaml")
    try:
        os.makedirs(folder, exist_ok=True)
        legacy = os.path.join(exp_dir, "config.yaml")
        if previous is not None and not os.listdir(folder) and os.path.isfile(legacy):
            os.replace(legacy, os.path.join(folder, "before.yaml"))  # a folder from before configs/ existed
        if os.path.isfile(path) and OmegaConf.to_container(OmegaConf.load(path)) != config:
            n = 1
            while os.path.exists(f"{path[:-5]}.{n}.yaml"):
                n += 1
            os.replace(path, f"{path[:-5]}.{n}.yaml")
        for target in (os.path.join(exp_dir, "config.yaml"), path):
            save_config(cfg, target)
    except OSError as e:
        return run_folder_error(cfg, exp_dir, e, f"cannot write {target}")
    return None


def run_folder_error(cfg, exp_dir: str, error: OSError, what: str = ""):
    what = what or f"cannot create the run folder {exp_dir}"
    reason = describe_write_error(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointWriteError(f"{what}: {reason}; free some space and start again (no step was trained, "
                                    "no checkpoint touched)")
    if error.errno == errno.ENAMETOOLONG and len(os.fsencode(cfg.exp_name)) > 255:
        return ConfigError(f"exp_name: {cfg.exp_name[:32]!r}... ({len(os.fsencode(cfg.exp_name))} bytes) is too long "
                           f"for a folder name in {cfg.output_dir} ({reason}; most file systems allow 255 bytes); "
                           "choose a shorter exp_name")
    blocker = exp_dir
    while blocker and not os.path.exists(blocker):
        blocker = os.path.dirname(blocker)
    if blocker and not os.path.isdir(blocker):
        return ConfigError(f"output_dir: {what}: {reason} ({blocker} is a file, not a folder); "
                           "choose another output_dir or exp_name")
    return ConfigError(f"output_dir: {what}: {reason}; choose an output_dir you can write to")

"""The default experiment folder of a training run: its name, and the hash of the settings that make
it another run (so two different runs never share a folder by accident)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from omegaconf import OmegaConf

from models.registry import is_elit
from training.config import TrainConfig, is_pixel_space
from utils.config import canonical_values, config_to_dict, declared_keys, to_config


# Keys that change what a run trains (declared `identity=True` with the key): a default experiment
# name carries a hash of those set to other values than the defaults, so that two different runs
# never share a folder by accident.
RUN_IDENTITY_KEYS = declared_keys(TrainConfig, "identity")


def _identity_values(config: dict) -> dict:
    """The RUN_IDENTITY_KEYS of a plain config dict, registry specs in their canonical form (so
    `prediction: v` is the default `velocity`)."""
    return canonical_values(TrainConfig, {k: config.get(k) for k in RUN_IDENTITY_KEYS})


def identity_hash(cfg) -> Optional[str]:
    """8 hex digits of the RUN_IDENTITY_KEYS that differ from the defaults (None when none does); the
    values as given are hashed, so a setting keeps the hash it had before aliases were canonical."""
    defaults = config_to_dict(OmegaConf.structured(TrainConfig))
    given = {k: cfg[k] for k in RUN_IDENTITY_KEYS if cfg.get(k) is not None or defaults.get(k) is not None}
    given = config_to_dict(to_config(given))
    same = _identity_values(given), _identity_values(defaults)
    changed = {k: v for k, v in given.items() if same[0][k] != same[1][k]}
    if not changed:
        return None
    return hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_exp_name(cfg, identity: Optional[str]) -> str:
    """`<model>-<resolution>[px]-<time distribution>[-mask...]`, then `-<identity hash>` for a run whose
    settings differ from the defaults, unless an older folder of the plain name holds the same run."""
    from dfm.timesteps import TIME_DISTRIBUTIONS

    name = cfg.model.replace("/", "-").lower()
    space = "px" if is_pixel_space(cfg) else ""
    budgets = ""
    if is_elit(cfg.model) and cfg.elit_max_mask_prob > 0:  # runs with other budgets get other folders
        lo, hi = cfg.elit_min_mask_prob, cfg.elit_max_mask_prob
        budgets = f"-mask{lo:g}" + (f"-{hi:g}" if hi != lo else "")
    plain = f"{name}-{cfg.resolution}{space}-{TIME_DISTRIBUTIONS.tag(cfg.time_distribution)}{budgets}"
    if identity is None or _same_run_folder(cfg, os.path.join(cfg.output_dir, plain)):
        return plain
    return f"{plain}-{identity}"


def _same_run_folder(cfg, folder: str) -> bool:
    """A folder of the plain default name, made before names carried the hash, by a run with the same settings."""
    from utils.config import MAX_CONFIG_BYTES
    from utils.records import RecordError, read_record

    try:
        saved = read_record(os.path.join(folder, "config.yaml"), "config", fmt="yaml", max_bytes=MAX_CONFIG_BYTES,
                            missing_ok=True)
    except (RecordError, OSError):  # an unreadable file (or a link, a FIFO) is not the same run
        return False
    if not isinstance(saved, dict):
        return False
    saved.setdefault("time_distribution", saved.get("weighting"))
    defaults = config_to_dict(OmegaConf.structured(TrainConfig))  # keys added since the folder was made
    current = config_to_dict(to_config({k: cfg[k] for k in RUN_IDENTITY_KEYS}))
    return _identity_values({**defaults, **saved}) == _identity_values(current)

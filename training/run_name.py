"""The default experiment folder of a training run: its name, and the hash of the settings that make
it another run (so two different runs never share a folder by accident)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from omegaconf import OmegaConf

from models.registry import is_elit
from utils.config import canonical_values, config_to_dict, declared_keys, to_config


class RunNaming:
    """The default experiment name of runs configured by ``config_type`` (a config dataclass whose
    fields declare ``identity=True`` when they change what a run trains; `utils.config.option_help`)."""

    def __init__(self, config_type):
        self.config_type = config_type
        # a default experiment name carries a hash of these keys set to other values than the defaults,
        # so that two different runs never share a folder by accident
        self.identity_keys = declared_keys(config_type, "identity")

    def _defaults(self) -> dict:
        return config_to_dict(OmegaConf.structured(self.config_type))

    def _identity_values(self, config: dict) -> dict:
        """The identity keys of a plain config dict, registry specs in their canonical form (so
        `prediction: v` is the default `velocity`)."""
        return canonical_values(self.config_type, {k: config.get(k) for k in self.identity_keys})

    def identity_hash(self, cfg) -> Optional[str]:
        """8 hex digits of the identity keys that differ from the defaults (None when none does); the
        values as given are hashed, so a setting keeps the hash it had before aliases were canonical."""
        defaults = self._defaults()
        given = {k: cfg[k] for k in self.identity_keys if cfg.get(k) is not None or defaults.get(k) is not None}
        given = config_to_dict(to_config(given))
        same = self._identity_values(given), self._identity_values(defaults)
        changed = {k: v for k, v in given.items() if same[0][k] != same[1][k]}
        if not changed:
            return None
        return hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def default_exp_name(self, cfg, identity: Optional[str], pixel: bool) -> str:
        """`<model>-<resolution>[px]-<time distribution>[-mask...]` (`px` for a `pixel`-space run), then
        `-<identity hash>` for a run whose settings differ from the defaults, unless an older folder of the
        plain name holds the same run."""
        from dfm.timesteps import TIME_DISTRIBUTIONS

        name = cfg.model.replace("/", "-").lower()
        space = "px" if pixel else ""
        budgets = ""
        if is_elit(cfg.model) and cfg.elit_max_mask_prob > 0:  # runs with other budgets get other folders
            lo, hi = cfg.elit_min_mask_prob, cfg.elit_max_mask_prob
            budgets = f"-mask{lo:g}" + (f"-{hi:g}" if hi != lo else "")
        plain = f"{name}-{cfg.resolution}{space}-{TIME_DISTRIBUTIONS.tag(cfg.time_distribution)}{budgets}"
        if identity is None or self._same_run_folder(cfg, os.path.join(cfg.output_dir, plain)):
            return plain
        return f"{plain}-{identity}"

    def _same_run_folder(self, cfg, folder: str) -> bool:
        """A folder of the plain default name, made before names carried the hash, by a run with the same
        settings."""
        from utils.config import MAX_CONFIG_BYTES
        from utils.records import RecordError, read_record

        try:
            saved = read_record(os.path.join(folder, "config.yaml"), "config", fmt="yaml",
                                max_bytes=MAX_CONFIG_BYTES, missing_ok=True)
        except (RecordError, OSError):  # an unreadable file (or a link, a FIFO) is not the same run
            return False
        if not isinstance(saved, dict):
            return False
        saved.setdefault("time_distribution", saved.get("weighting"))
        current = config_to_dict(to_config({k: cfg[k] for k in self.identity_keys}))
        # keys added since the folder was made count as their defaults
        return self._identity_values({**self._defaults(), **saved}) == self._identity_values(current)

"""Option names of the reference code (its train.py, its YAML files and the DFM README) -> ours
(docs/TRAINING.md, "Reference option names"): what `training.config.parse_config` accepts besides
our own keys."""
from __future__ import annotations

import re

from utils.config import Alias


def _resume_step(value, cfg) -> dict:
    """Reference `resume_step`: -1 = newest checkpoint, 0 = fresh start, N = checkpoint of step N.
    0 maps to `auto` (a fresh experiment folder has nothing to resume; we never overwrite one)."""
    step = int(value)
    return {"resume": "auto" if step <= 0 else str(step)}


def _adam_beta(index: int):
    def convert(value, cfg) -> dict:
        betas = list(cfg.betas)
        betas[index] = float(value)
        return {"betas": betas}
    return convert


class ReferenceAliases(dict):
    """The alias table, plus: any `s3*` / `aws*` key of the reference's remote data cache is
    ignored with a warning (we read local or mounted folders only)."""

    def get(self, key, default=None):
        if key in self:
            return self[key]
        if re.match(r"^(s3|aws)(_|$)|_s3(_|$)", str(key)):
            return Alias(note="remote (S3) data caches are not supported here; point data_dir at a local or "
                              "mounted copy")
        return default


# Option names of the reference code (its train.py / YAML files and the DFM README) -> ours
# (docs/TRAINING.md, "Reference option names").
TRAIN_ALIASES = ReferenceAliases({
    "stages_count": Alias("stages"),
    "learning_rate": Alias("lr"),
    "stage_sampling_thresholds": Alias("preview.thresholds"),
    "num_steps_per_scale": Alias("preview.num_steps_per_scale"),
    "adam_weight_decay": Alias("weight_decay"),
    "adam_epsilon": Alias("adam_eps"),
    "adam_beta1": Alias(convert=_adam_beta(0), note="betas[0]"),
    "adam_beta2": Alias(convert=_adam_beta(1), note="betas[1]"),
    "elit_group_size": Alias("group_size"),
    "weighting": Alias("time_distribution"),
    "resume_step": Alias(convert=_resume_step, note="resume (-1/0 -> auto, N -> step N)"),
    "epochs": Alias(note="training length is max_train_steps"),
    "logging_dir": Alias(note="logs go to <output_dir>/<exp_name>/log.txt"),
    "fused_attn": Alias(note="attention always runs torch's fused scaled_dot_product_attention"),
    "legacy": Alias(note="label dropout is always applied inside the model (cfg_prob)"),
})

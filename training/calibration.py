"""Stage calibration of a training run (SPEC §11): the `stage_scales` key.

`stage_scales: null` (default) trains the reference DFM, bit for bit. A list of S positive
numbers trains stage s on `c_s * P_s`; `auto` measures them once, at the start of a new run,
from a fixed seeded sample of the training data (rule: dfm/calibration.py). The scales become
part of the model's `arch`, so checkpoints and exported weights carry them, and resume,
previews, evaluation, generate.py and the budget sweep use them with no flag.
"""
from __future__ import annotations

from typing import Optional

import torch

from training.errors import ConfigError
from utils.config import config_to_dict

AUTO_SAMPLE_SIZE = 1024  # training items the `auto` rule reads (fewer if the dataset is smaller)
AUTO_BATCH = 64


def check_stage_scales_key(cfg) -> None:
    """Normalise and check `cfg.stage_scales` (None, "auto" or a list of S positive finite floats)
    and `cfg.stage_time_shift` (None or S finite floats)."""
    import math

    import dfm

    shift = cfg.stage_time_shift
    if shift is not None:
        plain = config_to_dict(shift) if hasattr(shift, "_content") else shift
        numbers = isinstance(plain, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in plain)
        if not numbers or len(plain) != cfg.stages:
            raise ConfigError(f"stage_time_shift needs {cfg.stages} finite numbers (one per stage), got {plain}")
        cfg.stage_time_shift = [float(v) for v in plain]

    value = cfg.stage_scales
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        cfg.stage_scales = None
        return
    if isinstance(value, str):
        if value.lower() == "auto":
            cfg.stage_scales = "auto"
            return
        raise ConfigError(f"stage_scales must be null, auto or a list of {cfg.stages} positive numbers, got {value!r}")
    try:
        cfg.stage_scales = dfm.check_stage_scales(list(value) if not isinstance(value, (int, float)) else value,
                                                  cfg.stages)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _describe(scales) -> str:
    return "none (no stage calibration)" if scales is None else str(list(scales))


def run_stage_scales(cfg, dataset, ckpt: Optional[dict], pixel_space: bool, log, decomposition) -> Optional[list]:
    """The scales this run trains with: a resumed run's come from its checkpoint (and must agree
    with the key); a new run's are the key's, with `auto` measured now on the levels of
    `decomposition` (the model's, without scales)."""
    given = cfg.stage_scales
    if ckpt is not None:
        import dfm

        arch = ckpt.get("arch") if isinstance(ckpt.get("arch"), dict) else {}
        try:
            stored = dfm.check_stage_scales(arch.get("stage_scales"), cfg.stages)
        except ValueError as e:
            raise ConfigError(f"resume: the checkpoint's arch holds stage_scales={arch.get('stage_scales')!r}, which "
                              f"this run cannot use ({e}); the file is damaged or was edited") from None
        explicit = given is not None and not isinstance(given, str)  # a list (ListConfig from YAML/overrides)
        agrees = (given == "auto" and stored is not None) or (given is None and stored is None) or (
            explicit and stored is not None and [float(c) for c in given] == [float(c) for c in stored])
        if not agrees:
            raise ConfigError(f"stage_scales={given if given is not None else 'null'}, but the checkpoint being "
                              f"resumed was trained with {_describe(stored)}; resume with the checkpoint's "
                              "stage_scales (or start a new experiment)")
        return stored
    if given != "auto":
        return given
    scales, n = measure_dataset_scales(dataset, decomposition, pixel_space, cfg.seed,
                                       skip_bad=cfg.bad_samples == "skip")
    log.info(f"stage_scales auto: {scales} (every level to the coarsest level's RMS, measured on {n} training "
             f"items drawn with seed {cfg.seed})")
    return scales


def measure_dataset_scales(dataset, decomposition, pixel_space: bool, seed: int,
                           skip_bad: bool = False) -> tuple[list, int]:
    """(`auto` scales, items read): a seeded sample of up to AUTO_SAMPLE_SIZE items, in the
    model's input space (latents: posterior samples from a seeded generator). A pure function
    of (dataset, seed): every rank measures the same numbers without a collective. Corrupt
    items raise (`bad_samples: error`) or are left out (`skip_bad`)."""
    from data.robust import CorruptSampleError
    from dfm import LevelEnergy
    from training.batch import model_space
    from utils.seeds import derive_seed

    if len(dataset) == 0:
        raise ConfigError("stage_scales=auto: the dataset holds no items to measure the stages on")
    g = torch.Generator().manual_seed(derive_seed(seed, 0, "stage-calibration", 0))
    indices = sorted(torch.randperm(len(dataset), generator=g)[:AUTO_SAMPLE_SIZE].tolist())
    energy = LevelEnergy(decomposition)
    read = 0
    for lo in range(0, len(indices), AUTO_BATCH):
        items = []
        for i in indices[lo:lo + AUTO_BATCH]:
            try:
                items.append(dataset[i])
            except CorruptSampleError:
                if not skip_bad:
                    raise
        if items:
            x = torch.stack([torch.as_tensor(item[-2]) for item in items])  # [(images,) data, label]
            energy.add(model_space(x, pixel_space, g))
            read += len(items)
    try:
        return energy.scales(), read
    except ValueError as e:
        raise ConfigError(f"stage_scales=auto: {e}") from None

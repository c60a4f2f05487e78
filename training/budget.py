"""ELIT's compute budget during training: one level per micro-batch, the same on every rank.

Multi-budget models (``elit_min_mask_prob < elit_max_mask_prob``) train every micro-batch at a
budget drawn uniformly from their levels (``models.budget_levels``); the draw comes from
``training.rng.shared_generator(seed, step, accumulation index)``, so all ranks agree without a
collective and a resumed run repeats it. Single-budget models get their one budget; SiT and
DFM-SiT models no budget at all. The budget reaches the model as ``inference_budget`` (the same
argument the samplers pass), so the budget rule (``models.elit.latents_per_window``) is shared.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from models.elit import latents_per_window, level_budgets, mask_levels
from models.registry import ELIT_WINDOWS_PER_SIDE, is_elit
from training.errors import ConfigError
from training.rng import shared_generator

REFERENCE_GROUP_SIZE = 4  # the reference's elit_group_size default: accepted (and dropped) for non-ELIT models


def resolve_elit_keys(cfg, grid: int) -> None:
    """The ELIT keys of a training config (`group_size`, `elit_min_mask_prob`, `elit_max_mask_prob`,
    `preview.budgets`): defaults filled in (group_size = grid / 4, elit_min_mask_prob = the max,
    the preview budgets of :func:`default_preview_budgets`) and checked; other models must leave
    them at their defaults. `grid`: the model's token grid side."""
    p = cfg.preview
    if not is_elit(cfg.model):
        if cfg.group_size == REFERENCE_GROUP_SIZE:  # the reference's YAML files carry it for every model
            cfg.group_size = None
        for key, default in (("group_size", None), ("elit_min_mask_prob", None), ("elit_max_mask_prob", 0.0)):
            if cfg[key] != default:
                raise ConfigError(f"{key}={cfg[key]} is an ELIT key, but {cfg.model} is not an ELIT model; "
                                  f"remove it, or train {cfg.model.replace('SiT-', 'ELIT-SiT-', 1)}")
        if p.budgets is not None:
            raise ConfigError(f"preview.budgets is for ELIT models only ({cfg.model} has no compute budget); "
                              "remove it")
        return
    divisors = [d for d in range(1, grid + 1) if grid % d == 0]
    if cfg.group_size is None:
        if grid % ELIT_WINDOWS_PER_SIDE:
            raise ConfigError(f"group_size: no default for the {grid}x{grid} token grid of {cfg.model} at "
                              f"resolution {cfg.resolution}; set group_size to one of {divisors}")
        cfg.group_size = grid // ELIT_WINDOWS_PER_SIDE
    if isinstance(cfg.group_size, bool) or not isinstance(cfg.group_size, int) or grid % cfg.group_size:
        raise ConfigError(f"group_size={cfg.group_size} must divide the {grid}x{grid} token grid of {cfg.model} at "
                          f"resolution {cfg.resolution}; allowed: {divisors}")
    if cfg.elit_min_mask_prob is None:
        cfg.elit_min_mask_prob = cfg.elit_max_mask_prob
    cfg.elit_min_mask_prob = float(cfg.elit_min_mask_prob)
    cfg.elit_max_mask_prob = float(cfg.elit_max_mask_prob)
    try:
        mask_levels(cfg.group_size, cfg.elit_min_mask_prob, cfg.elit_max_mask_prob)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if p.budgets is None:
        p.budgets = default_preview_budgets(
            level_budgets(cfg.group_size, cfg.elit_min_mask_prob, cfg.elit_max_mask_prob))
    if not len(p.budgets):
        raise ConfigError("preview.budgets must name at least one budget (or be null for the defaults)")
    for b in p.budgets:
        try:
            latents_per_window(b, cfg.group_size, grid * grid)
        except ValueError as e:
            raise ConfigError(f"preview.budgets: {e}") from None


class BudgetSampler:
    """``sampler(step, micro_batch)`` -> the model's extra forward kwargs (``{"inference_budget": b}``
    or ``{}``); ``log_values()`` -> the budget numbers of the current log window."""

    def __init__(self, model, seed: int):
        from models import budget_levels

        self.levels: List[float] = budget_levels(model)
        self.seed = int(seed)
        self.group_size = getattr(model, "group_size", None)
        self.num_tokens = model.grid * model.grid
        self.last: Optional[float] = None
        self._sum, self._count = 0.0, 0

    def level(self, step: int, micro_batch: int) -> float:
        """The budget (a fraction ``k / g^2``) of micro-batch ``micro_batch`` of optimizer step ``step``."""
        if len(self.levels) == 1:
            return self.levels[0]
        generator = shared_generator(self.seed, step, micro_batch, "budget")
        return self.levels[int(torch.randint(len(self.levels), (1,), generator=generator))]

    def __call__(self, step: int, micro_batch: int) -> dict:
        if not self.levels:
            return {}
        budget = self.level(step, micro_batch)
        self.last = budget
        self._sum += budget
        self._count += 1
        return {"inference_budget": budget}

    def log_values(self) -> dict:
        """``budget`` (the last micro-batch's), ``budget_k`` (its latents per window),
        ``budget_tokens`` (its kept latents in total) and ``budget_mean`` (over the micro-batches
        since the previous call, which starts a new window); ``{}`` for models without a budget."""
        if self.last is None:
            return {}
        k = latents_per_window(self.last, self.group_size, self.num_tokens)
        values = {"budget": self.last, "budget_k": k,
                  "budget_tokens": k * (self.num_tokens // self.group_size ** 2),
                  "budget_mean": self._sum / max(self._count, 1)}
        self._sum, self._count = 0.0, 0
        return values


def default_preview_budgets(levels: List[float]) -> List[float]:
    """Preview budgets when ``preview.budgets`` is null: the one level of a single-budget model;
    the smallest, middle and largest level of a multi-budget one (ascending, no repeats)."""
    if len(levels) <= 1:
        return list(levels)
    return sorted({levels[0], levels[(len(levels) - 1) // 2], levels[-1]})

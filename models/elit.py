"""ELIT's latent interface (SPEC §9): Read, Write, and the budget rule.

A token grid ``grid x grid`` (row-major, N = grid^2 tokens) is cut into ``g x g`` windows
(``group_size`` g, ``g^2`` tokens each, ``W = N / g^2`` windows). The windowed layout used
here is window-major: ``(B, W * g^2, D)`` with window ``w = (row // g) * (grid // g) + col // g``
and, inside it, the local index ``(row % g) * g + col % g`` (row-major within the window).

Read turns every window's image tokens into ``g^2`` latents, ordered by importance; the budget
keeps the first ``k`` latents of every window for the core blocks; Write puts the update back
on the image tokens. Module and parameter names follow the reference checkpoints
(``input_token_editor.adapters.0...``, ``output_token_editor.adapters.0...``).

The budget rule (``latents_per_window``) and the budget levels (``mask_levels``,
``budget_levels``) are the one place that turns a budget into a latent count, for training
and sampling alike.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.blocks import Mlp
from models.layers import modulate

LATENT_POS_TOKENS = 4096  # rows of the latent position table (a 64 x 64 token grid at most)
_EPS = 1e-6  # fractions that are exact levels in decimal (e.g. 0.3 * 10) must not round down


# ---------------------------------------------------------------------------- budget rule
def mask_levels(group_size: int, min_mask_prob: float, max_mask_prob: float) -> List[float]:
    """Training mask probabilities ``j / g^2`` (j = 0 .. g^2 - 1) inside ``[min, max]``, ascending.

    ``k = g^2 - j`` latents per window are kept at level ``j / g^2``. Raises a ValueError naming
    ``elit_min_mask_prob`` / ``elit_max_mask_prob`` when they are out of order, outside
    ``[0, 1)``, or enclose no level.
    """
    g2 = int(group_size) ** 2
    lo, hi = float(min_mask_prob), float(max_mask_prob)
    if not (0.0 <= lo < 1.0 and 0.0 <= hi < 1.0):
        raise ValueError(f"elit_min_mask_prob and elit_max_mask_prob must lie in [0, 1) (a window keeps "
                         f"at least one latent), got {lo} and {hi}")
    if lo > hi:
        raise ValueError(f"elit_min_mask_prob ({lo}) must be <= elit_max_mask_prob ({hi})")
    levels = [j / g2 for j in range(g2) if lo - 1e-9 <= j / g2 <= hi + 1e-9]
    if not levels:
        raise ValueError(f"[elit_min_mask_prob, elit_max_mask_prob] = [{lo}, {hi}] holds no mask level; "
                         f"with group_size {group_size} the levels are multiples of 1/{g2}")
    return levels


def budget_levels(model) -> List[float]:
    """The budgets a model was trained with, as fractions ``k / g^2`` in ascending order.

    ELIT models: one entry per mask level in ``[elit_min_mask_prob, elit_max_mask_prob]``
    (each can be passed as ``inference_budget``); models without a budget (SiT, DFM-SiT): ``[]``.
    """
    if getattr(model, "group_size", None) is None:
        return []
    return level_budgets(model.group_size, model.elit_min_mask_prob, model.elit_max_mask_prob)


def level_budgets(group_size: int, min_mask_prob: float, max_mask_prob: float) -> List[float]:
    """The training budgets ``k / g^2`` of the mask levels in ``[min, max]`` (see :func:`mask_levels`),
    ascending; the same ValueErrors."""
    g2 = int(group_size) ** 2
    keep = sorted(g2 - round(p * g2) for p in mask_levels(group_size, min_mask_prob, max_mask_prob))
    return [k / g2 for k in keep]


def latents_per_window(budget, group_size: int, num_tokens: int) -> int:
    """``k``, the latents kept in each window, for an ``inference_budget``.

    budget <= 1: a fraction of the ``g^2`` latents of a window, ``k = floor(g^2 * budget)``
    (``mask_prob = 1 - budget``, ``k = int(g^2 (1 - mask_prob))``; fractions between levels
    round down); budget > 1: a total latent count, a multiple of the number of windows up to
    ``num_tokens``. Anything else raises a ValueError naming ``inference_budget``.
    """
    g2 = int(group_size) ** 2
    windows = num_tokens // g2
    # plain comparisons only (no math.isfinite): torch.compile traces this with a symbolic float
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0 < budget < math.inf:
        raise ValueError(f"inference_budget must be a fraction in (0, 1] or a latent count, got {budget!r}")
    if budget <= 1:
        k = int(math.floor(g2 * float(budget) + _EPS))
        if k < 1:
            raise ValueError(f"inference_budget {budget} keeps no latent of a {g2}-latent window; "
                             f"allowed: fractions in [1/{g2}, 1] or latent counts {windows}, {2 * windows}, "
                             f"..., {num_tokens}")
        return k
    if float(budget) != int(budget) or int(budget) % windows or int(budget) > num_tokens:
        raise ValueError(f"inference_budget {budget} > 1 is a latent count: allowed are multiples of the "
                         f"{windows} windows up to {num_tokens} ({windows}, {2 * windows}, ..., {num_tokens}), "
                         f"or a fraction in (0, 1]")
    return int(budget) // windows


def keep_mask(grid: int, group_size: int, k: int) -> torch.Tensor:
    """(grid * grid,) bool over the row-major token grid: True where a latent is kept, i.e. its
    row-major index inside its ``g x g`` window is below ``k``."""
    idx = window_order(grid, group_size)  # (W, g^2) row-major positions
    mask = torch.zeros(grid * grid, dtype=torch.bool)
    mask[idx[:, :k].reshape(-1)] = True
    return mask


# ------------------------------------------------------------------------------ windowing
def window_order(grid: int, group_size: int) -> torch.Tensor:
    """(W, g^2) long: the row-major grid position of local token j of window w."""
    g = group_size
    pos = torch.arange(grid * grid).view(grid // g, g, grid // g, g)
    return pos.permute(0, 2, 1, 3).reshape(-1, g * g)


def to_windows(x: torch.Tensor, grid: int, group_size: int) -> torch.Tensor:
    """(B, N, D) row-major tokens -> (B, N, D) window-major (see the module docstring)."""
    B, _, D = x.shape
    g, n = group_size, grid // group_size
    return x.reshape(B, n, g, n, g, D).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, D)


def from_windows(x: torch.Tensor, grid: int, group_size: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`."""
    B, _, D = x.shape
    g, n = group_size, grid // group_size
    return x.reshape(B, n, n, g, g, D).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, D)


def select_latents(latents: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """(B, W * g^2, D) window-major latents -> (B, W * k, D): the first ``k`` of every window."""
    B, _, D = latents.shape
    g2 = group_size * group_size
    if k == g2:
        return latents
    return latents.reshape(B, -1, g2, D)[:, :, :k].reshape(B, -1, D)


def merge_latents(latents: torch.Tensor, updated: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Put the core's ``updated`` (B, W * k, D) back in front of every window of ``latents``
    (B, W * g^2, D); the dropped latents keep their values."""
    B, _, D = latents.shape
    g2 = group_size * group_size
    if k == g2:
        return updated
    windows = latents.reshape(B, -1, g2, D)
    return torch.cat([updated.reshape(B, -1, k, D), windows[:, :, k:]], dim=2).reshape(B, -1, D)


# --------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """``scale * x / (rms(x) + eps)`` over the last dim, computed in float32 (the reference's form:
    eps is added to the RMS, not inside the square root)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        rms = xf.norm(2, dim=-1, keepdim=True) * xf.shape[-1] ** -0.5
        return (self.scale * (xf / (rms + self.eps)).to(x.dtype)).to(x.dtype)


class CrossAttention(nn.Module):
    """Queries from one token set, keys/values from another: q_proj (D->D), kv_proj (D->2D),
    RMSNorm on q and k over the full width before the heads split, SDPA, proj (with bias)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=True)
        self.q_norm = RMSNorm(dim)
        self.k_norm = RMSNorm(dim)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """queries (B, Lq, D), context (B, Lk, D) -> (B, Lq, D)."""
        B, Lq, D = queries.shape
        h = self.num_heads
        q = self.q_norm(self.q_proj(queries))
        k, v = self.kv_proj(context).chunk(2, dim=-1)
        k = self.k_norm(k)
        q, k, v = (z.reshape(B, -1, h, D // h).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, Lq, D))


class ReadLayer(nn.Module):
    """The Read cross-attention + MLP with adaLN (reference name ``fit_layer``).

    ``adaLN_modulation``: SiLU -> Linear(D, 7D): shift/scale of the image tokens (keys/values),
    attention gate, shift/scale/gate of the MLP; the 7th chunk is unused.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.patches_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.latent_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.latents_attend_to_patches = nn.ModuleList([CrossAttention(dim, num_heads)])
        self.read_ff = nn.ModuleList([Mlp(dim, dim, bias=False)])
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 7 * dim))

    def forward(self, queries: torch.Tensor, patches: torch.Tensor, c: torch.Tensor, g2: int) -> torch.Tensor:
        """queries, patches: (B, W * g^2, D) window-major; c: (B, D) -> latents (B, W * g^2, D)."""
        B, T, D = patches.shape
        shift_p, scale_p, gate_a, shift_m, scale_m, gate_m, _ = self.adaLN_modulation(c).chunk(7, dim=-1)
        context = modulate(self.patches_norm(patches), shift_p, scale_p)
        read = self.latents_attend_to_patches[0](queries.reshape(-1, g2, D), context.reshape(-1, g2, D))
        q = queries + gate_a.unsqueeze(1) * read.reshape(B, T, D)
        return q + gate_m.unsqueeze(1) * self.read_ff[0](modulate(self.latent_norm(q), shift_m, scale_m))


class LatentRead(nn.Module):
    """Image tokens -> latents, window by window (reference ``input_token_editor.adapters.0``).

    Tables: ``learned_query_embed`` (g^2, D) the queries of every window, ``pos_embed`` (g^2, D)
    the in-window position added to the image tokens, ``latent_pos_embed`` (4096, D) indexed by
    the row-major grid position a latent sits at.
    """

    def __init__(self, dim: int, num_heads: int, group_size: int):
        super().__init__()
        g2 = group_size * group_size
        self.group_size = group_size
        self.learned_query_embed = nn.Parameter(torch.zeros(g2, dim))
        self.pos_embed = nn.Parameter(torch.zeros(g2, dim))
        self.latent_pos_embed = nn.Parameter(torch.zeros(LATENT_POS_TOKENS, dim))
        self.fit_layer = ReadLayer(dim, num_heads)

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, D) row-major image tokens, c: (B, D) ->
        (latents (B, N, D) window-major, patches (B, N, D) window-major tokens + ``pos_embed``)."""
        B, N, D = x.shape
        g2 = self.group_size ** 2
        patches = (to_windows(x, grid, self.group_size).reshape(B, -1, g2, D)
                   + self.pos_embed.to(x.dtype)).reshape(B, N, D)
        queries = self.learned_query_embed.to(x.dtype).repeat(N // g2, 1).expand(B, N, D)
        latents = self.fit_layer(queries, patches, c, g2)
        position = to_windows(self.latent_pos_embed[None, :N], grid, self.group_size)
        return latents + position.to(latents.dtype), patches


class LatentWrite(nn.Module):
    """Latents -> image tokens (reference ``output_token_editor.adapters.0``): the window's image
    tokens (+ ``pos_embed``) attend to all ``g^2`` latents of their window, then an MLP; no norm,
    no adaLN. ``proj`` and ``fc2`` are zero at init, so Write starts as ``p + pos_embed``."""

    def __init__(self, dim: int, num_heads: int, group_size: int):
        super().__init__()
        g2 = group_size * group_size
        self.group_size = group_size
        self.pos_embed = nn.Parameter(torch.zeros(g2, dim))
        self.patches_attend_to_latents = nn.ModuleList([CrossAttention(dim, num_heads)])
        self.write_ff = nn.ModuleList([Mlp(dim, dim, bias=False)])

    def forward(self, patches: torch.Tensor, latents: torch.Tensor, grid: int) -> torch.Tensor:
        """patches, latents: (B, N, D) window-major -> (B, N, D) row-major image tokens."""
        B, N, D = patches.shape
        g2 = self.group_size ** 2
        p = (patches.reshape(B, -1, g2, D) + self.pos_embed.to(patches.dtype)).reshape(-1, g2, D)
        p = p + self.patches_attend_to_latents[0](p, latents.reshape(-1, g2, D))
        p = p + self.write_ff[0](p)
        return from_windows(p.reshape(B, N, D), grid, self.group_size)


class TokenEditor(nn.Module):
    """Holds one adapter under ``adapters.0`` (the reference checkpoints' nesting)."""

    def __init__(self, adapter: nn.Module):
        super().__init__()
        self.adapters = nn.ModuleList([adapter])

    def forward(self, *args):
        return self.adapters[0](*args)


def init_latent_interface(read: LatentRead, write: LatentWrite) -> None:
    """Reference init: tables N(0, 0.02); Read's adaLN, Write's ``proj`` and ``fc2`` zero;
    the other Linears keep PyTorch's default init; RMSNorm scales 1."""
    for table in (read.learned_query_embed, read.pos_embed, read.latent_pos_embed, write.pos_embed):
        nn.init.normal_(table, std=0.02)
    nn.init.zeros_(read.fit_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(read.fit_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(write.patches_attend_to_latents[0].proj.weight)
    nn.init.zeros_(write.patches_attend_to_latents[0].proj.bias)
    nn.init.zeros_(write.write_ff[0].fc2.weight)

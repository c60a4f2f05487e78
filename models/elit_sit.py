"""ELIT-SiT and DFM-ELIT-SiT (SPEC §9): a SiT / DFM-SiT whose middle blocks run on latents.

Blocks: head (the first ``encoder_depth``) on the image tokens, Read, core on the first ``k``
latents of every window, Write, tail (the last ``tail_depth``) on the image tokens. Everything
else (embedders, heads, stages, REPA projectors, the forward's arguments) is the SiT's.
"""
from __future__ import annotations

from typing import Annotated, List

import torch

from models.elit import (LATENT_POS_TOKENS, LatentRead, LatentWrite, TokenEditor, budget_levels,
                         init_latent_interface, latents_per_window, mask_levels, merge_latents,
                         select_latents, window_order)
from models.layers import cpu_constant
from models.sit import Blocks, Depth, SiT, Size
from utils.registry import Between

MaskProbability = Annotated[float, Between(0, 1, high_open=True)]  # a window keeps at least one latent


class ELITSiT(SiT):
    """SiT (``multistage=False``) or DFM-SiT (``multistage=True``) with ELIT's latent interface.

    ``inference_budget`` (forward): a fraction in (0, 1] of the ``g^2`` latents per window or a
    latent count (see :func:`models.elit.latents_per_window`). None means the model's only
    training budget; a model trained with several budgets (``elit_min_mask_prob <
    elit_max_mask_prob``) raises a ValueError instead, in train and eval mode alike: the trainer
    passes the level it drew, samplers the budget asked for.

    Block parts that take ``positions`` see, in the head and tail blocks, the image tokens' grid
    coordinates, and in the core blocks the coordinates of the grid position each kept latent
    stands for (latent j of window w: local position j of that window, as the reference's latent
    position table is indexed), in the core's window-major order.
    """

    constant_tensors = SiT.constant_tensors + ("window_index",)

    def __init__(self, *, group_size: Size, elit_tail_depth: Blocks, elit_min_mask_prob: MaskProbability = 0.0,
                 elit_max_mask_prob: MaskProbability = 0.0, encoder_depth: Blocks = 8, depth: Depth = 28,
                 hidden_size: Size = 1152, num_heads: Size = 16, **sit_kwargs):
        super().__init__(encoder_depth=encoder_depth, depth=depth, hidden_size=hidden_size,
                         num_heads=num_heads, **sit_kwargs)
        if not 0 <= encoder_depth or not 0 <= elit_tail_depth or encoder_depth + elit_tail_depth >= depth:
            raise ValueError(f"ELIT needs encoder_depth (head blocks, {encoder_depth}) + elit_tail_depth "
                             f"(tail blocks, {elit_tail_depth}) < depth ({depth}), both >= 0, so that at least "
                             f"one core block runs on the latents")
        if not isinstance(group_size, int) or group_size < 1 or self.grid % group_size:
            divisors = [d for d in range(1, self.grid + 1) if self.grid % d == 0]
            raise ValueError(f"group_size must divide the {self.grid}x{self.grid} token grid "
                             f"(input_size / patch size); allowed: {divisors}, got {group_size!r}")
        if self.grid * self.grid > LATENT_POS_TOKENS:
            raise ValueError(f"ELIT's latent position table holds {LATENT_POS_TOKENS} tokens, but the "
                             f"{self.grid}x{self.grid} token grid has {self.grid ** 2}; lower input_size")
        mask_levels(group_size, elit_min_mask_prob, elit_max_mask_prob)  # validates the range
        self.group_size = group_size
        self.tail_depth = elit_tail_depth
        self.elit_min_mask_prob = float(elit_min_mask_prob)
        self.elit_max_mask_prob = float(elit_max_mask_prob)
        self.input_token_editor = TokenEditor(LatentRead(hidden_size, num_heads, group_size))
        self.output_token_editor = TokenEditor(LatentWrite(hidden_size, num_heads, group_size))
        # (W, g^2) grid index of latent j of window w
        self.window_index = cpu_constant(window_order, self.grid, group_size)
        init_latent_interface(self.input_token_editor.adapters[0], self.output_token_editor.adapters[0])

    def kept_latents(self, inference_budget=None) -> int:
        """Latents per window the core sees for ``inference_budget`` (None: the one trained budget)."""
        if inference_budget is None:
            levels = budget_levels(self)
            if len(levels) > 1:
                raise ValueError(
                    f"{self.arch.get('name', 'this ELIT model')} was trained with {len(levels)} budgets "
                    f"(elit_min_mask_prob={self.elit_min_mask_prob}, elit_max_mask_prob="
                    f"{self.elit_max_mask_prob}): pass inference_budget, a fraction in (0, 1] (levels: "
                    f"{', '.join(f'{b:g}' for b in levels)}) or a latent count")
            inference_budget = levels[0]
        return latents_per_window(inference_budget, self.group_size, self.grid * self.grid)

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor, return_features: bool, inference_budget=None):
        """head -> Read -> core on the kept latents -> Write -> tail; REPA reads the head's output."""
        k = self.kept_latents(inference_budget)
        head, tail = self.encoder_depth, len(self.blocks) - self.tail_depth
        for block in self.blocks[:head]:
            x = block(x, c, self.token_positions)
        zs: List[torch.Tensor] = self.project(x) if return_features else []
        latents, patches = self.input_token_editor(x, c, self.grid)
        core = select_latents(latents, k, self.group_size)
        core_positions = self.latent_positions(k)
        for block in self.blocks[head:tail]:
            core = block(core, c, core_positions)
        latents = merge_latents(latents, core, k, self.group_size)
        x = self.output_token_editor(patches, latents, self.grid)
        for block in self.blocks[tail:]:
            x = block(x, c, self.token_positions)
        return x, zs

    def latent_positions(self, k: int) -> torch.Tensor:
        """(W * k, 2) grid coordinates of the first ``k`` latents of every window, window-major (the
        order of the core's tokens)."""
        return self.token_positions[self.window_index[:, :k].reshape(-1)]

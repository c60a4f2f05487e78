"""Embedders, heads and helpers of SiT / DiT (SPEC §3); the transformer block is in models/blocks.py.
Parameter names match the published checkpoints."""
from __future__ import annotations

import math
from typing import List

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens (B, T, D) by per-sample shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed MAE-style 2-D sin-cos position embedding, (grid_size**2, dim), row-major tokens.

    The first half of the channels encodes the column coordinate, the second half the row
    coordinate; each half is ``[sin(pos * omega), cos(pos * omega)]`` with
    ``omega_i = 10000^(-i / (dim/4))``.
    """
    if dim % 4 != 0:
        raise ValueError(f"hidden size must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                             np.arange(grid_size, dtype=np.float64), indexing="ij")

    def embed_1d(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1)


def cpu_constant(make, *args) -> torch.Tensor:
    """``make(*args)`` computed on the CPU, then moved to the default device: a constant of the
    architecture holds its values in a meta-device build too, and building it there costs no
    one-time import of torch's meta kernels (seconds on a busy machine)."""
    default = torch.empty(0).device
    with torch.device("cpu"):
        return make(*args).to(default)


def grid_positions(grid_size: int) -> torch.Tensor:
    """(grid_size**2, 2) float32 (row, column) coordinates of the tokens of a row-major grid."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: (B, C, H, W) -> (B, (H/p)(W/p), D), row-major."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: every block then sees one memory layout (a compiled block needs one graph, not two)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Raw t in [0, 1] -> 256-d sinusoid ``[cos, sin]`` -> Linear -> SiLU -> Linear."""

    frequency_dim = 256

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.frequency_dim, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) -> (B, dim): ``freqs = exp(-ln(max_period) * arange(dim/2) / (dim/2))``."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row ``num_classes`` is the null label used for CFG.

    In ``train()`` mode labels are dropped to null with probability ``dropout_prob``.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class FinalLayer(nn.Module):
    """LayerNorm -> adaLN modulation -> Linear(D, p*p*C)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int, grid: int) -> torch.Tensor:
    """(B, grid*grid, p*p*C) with each row ordered (p, q, c), c fastest -> (B, C, grid*p, grid*p)."""
    B = tokens.shape[0]
    p = patch_size
    x = tokens.reshape(B, grid, grid, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, channels, grid * p, grid * p)


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: D -> 2048 -> 2048 -> z_dim with SiLU in between (keys 0, 2, 4)."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))


class StagePatchEmbedders(nn.Module):
    """DFM: one patch embedder per stage; all stages land on the same token grid (summed).

    Stage ``s`` of side ``H_s`` (``H / 2^(S-1-s)`` for the Laplacian pyramid) and ``C_s`` channels
    uses patch ``p_s = p H_s / H``. Where that is below 1 (e.g. S = 3 on a /2 model) the level is
    nearest-upsampled by ``1 / p_s`` and embedded with patch 1; the matching output head predicts
    on the upsampled grid and is average-pooled back.
    """

    def __init__(self, patch_sizes: List[float], channels: List[int], hidden_size: int):
        super().__init__()
        self.patch_sizes = patch_sizes
        self.embedders = nn.ModuleList(
            [PatchEmbed(max(1, int(p)), c, hidden_size) for p, c in zip(patch_sizes, channels)])

    def forward(self, xs: List[torch.Tensor]) -> torch.Tensor:
        tokens = 0
        for p, embedder, x in zip(self.patch_sizes, self.embedders, xs):
            if p < 1:
                x = F.interpolate(x, scale_factor=int(round(1 / p)), mode="nearest")
            tokens = tokens + embedder(x)
        return tokens


class StageTimestepEmbedders(nn.Module):
    """DFM: one timestep embedder per stage; their embeddings are summed."""

    def __init__(self, num_stages: int, hidden_size: int):
        super().__init__()
        self.embedders = nn.ModuleList([TimestepEmbedder(hidden_size) for _ in range(num_stages)])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B, S) -> (B, D)."""
        return sum(embedder(t[:, s]) for s, embedder in enumerate(self.embedders))


class StageFinalLayers(nn.Module):
    """DFM: one output head per stage, all reading the same final tokens and conditioning."""

    def __init__(self, patch_sizes: List[float], hidden_size: int, channels: List[int]):
        super().__init__()
        self.patch_sizes = patch_sizes
        self.channels = list(channels)
        self.projections = nn.ModuleList(
            [FinalLayer(hidden_size, max(1, int(p)), c) for p, c in zip(patch_sizes, channels)])

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: int) -> List[torch.Tensor]:
        outputs = []
        for p, channels, head in zip(self.patch_sizes, self.channels, self.projections):
            out = unpatchify(head(x, c), max(1, int(p)), channels, grid)
            if p < 1:
                out = F.avg_pool2d(out, kernel_size=int(round(1 / p)))
            outputs.append(out)
        return outputs

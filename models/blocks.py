"""The transformer block of SiT / DiT (adaLN-Zero, SPEC §3) and its parts, each chosen by name.

A block is ``norm -> modulate -> attention``, gated, then ``norm -> modulate -> MLP``, gated. Its
three parts are registries; a model picks them with the ``mlp``, ``norm`` and ``attention`` arch
options (``model_overrides: {mlp: swiglu}`` in a training config, stored in the checkpoint's
``arch``). A new part is one function or class here, registered by name::

    @MLPS.register("swiglu")
    class SwiGLU(nn.Module):
        def __init__(self, dim: int, hidden: int, bias: bool = True): ...

The context arguments (``dim``, ``hidden`` = ``int(dim * mlp_ratio)``, ``num_heads``,
``qk_norm``) come from the model; the other parameters are the part's config. A part whose
``forward`` takes a ``positions`` argument gets the (row, column) grid coordinates of its
tokens, ``(T, 2)`` float: the image tokens' for SiT and DFM-SiT, and for ELIT's core blocks the
grid positions the kept latents stand for (``models.elit.latent_positions``). Parts that encode
positions themselves (RoPE) usually go with ``position_embedding: none`` (no sin-cos table). Parameter names
inside a part are the checkpoint's key names (``blocks.{i}.mlp.fc1.weight``); the defaults keep
the published SiT / REPA / DFM key names. FLOPs are counted op by op (``bench.flops``), and
compilation compiles whole blocks (``models.compile``), so a new part needs nothing else.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import modulate
from utils.registry import Registry

MLPS = Registry("MLP", default="gelu", context=("dim", "hidden"))
NORMS = Registry("normalisation", default="layernorm", context=("dim",))
ATTENTIONS = Registry("attention", default="sdpa", context=("dim", "num_heads", "qk_norm"))


@ATTENTIONS.register("sdpa")
class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash on GPU); qkv bias,
    optional qk-norm (REPA's: timm's default LayerNorm over the head dim)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        # REPA builds qk-norm with timm's default nn.LayerNorm (affine, eps 1e-5): keep it loadable
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


@MLPS.register("gelu")
class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear (keys fc1, fc2): SiT's MLP."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@NORMS.register("layernorm")
def layer_norm(dim: int, eps: float = 1e-6, affine: bool = False) -> nn.Module:
    """LayerNorm over the hidden dim; SiT's has no affine parameters and eps 1e-6."""
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=eps)


def takes_positions(part: nn.Module) -> bool:
    """Whether a block part's ``forward`` has a ``positions`` parameter (then the block passes them)."""
    return "positions" in inspect.signature(part.forward).parameters


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning; ``mlp``, ``norm`` and ``attention`` are specs
    of :data:`MLPS`, :data:`NORMS` and :data:`ATTENTIONS`. ``forward(x, c, positions)``: parts that
    take ``positions`` (see the module docstring) get them."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 mlp=MLPS.default(), norm=NORMS.default(), attention=ATTENTIONS.default()):
        super().__init__()
        self.norm1 = NORMS.build(norm, dim=hidden_size)
        self.attn = ATTENTIONS.build(attention, dim=hidden_size, num_heads=num_heads, qk_norm=qk_norm)
        self.norm2 = NORMS.build(norm, dim=hidden_size)
        self.mlp = MLPS.build(mlp, dim=hidden_size, hidden=int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self._with_positions = {name for name in ("norm1", "attn", "norm2", "mlp") if takes_positions(getattr(self, name))}

    def _part(self, name: str, x: torch.Tensor, positions) -> torch.Tensor:
        part = getattr(self, name)
        return part(x, positions=positions) if name in self._with_positions else part(x)

    def forward(self, x: torch.Tensor, c: torch.Tensor, positions: torch.Tensor = None) -> torch.Tensor:
        """x (B, T, D) tokens, c (B, D) conditioning, positions (T, 2) their grid coordinates."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = modulate(self._part("norm1", x, positions), shift_msa, scale_msa)
        x = x + gate_msa.unsqueeze(1) * self._part("attn", h, positions)
        h = modulate(self._part("norm2", x, positions), shift_mlp, scale_mlp)
        x = x + gate_mlp.unsqueeze(1) * self._part("mlp", h, positions)
        return x


@NORMS.register("rmsnorm")
def rms_norm(dim: int, eps: float = 1e-6, affine: bool = False) -> nn.Module:
    """RMSNorm over the hidden dim (no mean subtraction); without affine parameters by default, as the
    block's adaLN modulation supplies scale and shift."""
    return nn.RMSNorm(dim, eps=eps, elementwise_affine=affine)


def axial_rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """(T, head_dim / 2) rotation angles of 2-D axial RoPE: the first half of the channel pairs turns
    with the row coordinate, the second half with the column, at frequencies ``base^(-i / n)``."""
    n = head_dim // 4
    dtype = torch.promote_types(positions.dtype, torch.float32)  # at least float32 (bf16 angles would drift)
    freqs = base ** (-torch.arange(n, dtype=dtype, device=positions.device) / n)
    positions = positions.to(dtype)
    return torch.cat([positions[:, :1] * freqs, positions[:, 1:2] * freqs], dim=1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs (2i, 2i + 1) of x (B, H, T, D) by angles (T, D / 2)."""
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    first, second = pairs[..., :1], pairs[..., 1:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1).flatten(-2).to(x.dtype)


@ATTENTIONS.register("rope")
class RoPEAttention(Attention):
    """Self-attention with 2-D axial rotary position embeddings on queries and keys (after qk-norm):
    attention scores depend on the tokens' grid offsets only. The same parameters (keys) as ``sdpa``;
    usually with ``position_embedding: none``. ``base``: the longest wavelength's scale (100 suits grids
    of up to a few hundred tokens per side)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, base: float = 100.0):
        super().__init__(dim, num_heads, qk_norm)
        if self.head_dim % 4:
            raise ValueError(f"attention 'rope' needs a head dim divisible by 4 (two axes of channel pairs), got "
                             f"{self.head_dim}")
        if not base > 1:
            raise ValueError(f"attention 'rope': base must be > 1, got {base}")
        self.base = float(base)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        angles = axial_rope_angles(positions, self.head_dim, self.base)
        q, k = rotate(self.q_norm(q), angles), rotate(self.k_norm(k), angles)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))

"""SiT and DFM-SiT (SPEC §3): one transformer backbone, per-stage interfaces for DFM.

A SiT is the one-stage case: its forward takes the same pyramid-shaped arguments, so the
objective and the samplers never ask which kind of model they hold.
"""
from __future__ import annotations

from typing import Annotated, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from dfm.decompositions import DECOMPOSITIONS
from dfm.paths import PATHS
from dfm.predictions import PREDICTIONS

from models.blocks import ATTENTIONS, MLPS, NORMS, SiTBlock
from models.layers import (FinalLayer, LabelEmbedder, PatchEmbed, StageFinalLayers,
                           StagePatchEmbedders, StageTimestepEmbedders, TimestepEmbedder,
                           build_projector, cpu_constant, grid_positions, sincos_pos_embed_2d, unpatchify)
from utils.registry import Above, Between, Range

POSITION_EMBEDDINGS = ("sincos", "none")
# Upper bounds of the options that multiply work without a parameter to show for it (the parameter
# count itself is bounded by models.registry.MAX_PARAMETERS): 1024 blocks (SiT-XL has 28), 16 DFM
# stages (a 2^15-fold Laplacian), a 256 x 256 token grid (4096 px images at /2 with the VAE's x8).
# Every width or count is at most 2^20 and the MLP at most 1024 times the width, so that no product
# of them overflows torch's sizes before the parameter count can be checked.
MAX_DEPTH, MAX_STAGES, MAX_TOKENS, MAX_SIZE, MAX_MLP_RATIO = 1024, 16, 256 * 256, 2**20, 1024

# The constructor's annotations are its schema: models.registry checks every option given on the
# command line, in YAML or in a stored arch against them (utils.registry.check_arguments).
Size = Annotated[int, Between(1, MAX_SIZE)]
Depth = Annotated[int, Between(1, MAX_DEPTH)]
Blocks = Annotated[int, Between(0, MAX_DEPTH)]  # a part of the depth (REPA's / ELIT's head, ELIT's tail)
Probability = Annotated[float, Between(0, 1)]


class SiT(nn.Module):
    """Class-conditional flow transformer.

    ``multistage=False`` builds a plain SiT (one patch embedder, timestep embedder and head,
    with the SiT/REPA key names); ``multistage=True`` builds DFM-SiT with ``stages`` copies of
    each interface (the reference implementation's key names).

    What the output means is part of the model: ``path_type`` (a spec of ``dfm.paths.PATHS``)
    and ``prediction`` (``dfm.predictions.PREDICTIONS``) are built into ``self.path`` and
    ``self.prediction``, which the objective and the samplers read. ``position_embedding``:
    ``sincos`` adds the fixed 2-D sin-cos table to the tokens (SiT's), ``none`` adds nothing
    (for attention parts that encode positions themselves, e.g. RoPE). Every block part that
    takes a ``positions`` argument gets the (row, column) grid coordinates of its tokens.
    """

    def __init__(self, input_size: Size = 32, patch_size: Size = 2, in_channels: Size = 4,
                 hidden_size: Size = 1152, depth: Depth = 28, num_heads: Size = 16,
                 mlp_ratio: Annotated[float, Range(0, MAX_MLP_RATIO, low_open=True)] = 4.0, num_classes: Size = 1000,
                 class_dropout_prob: Probability = 0.1, stages: Annotated[int, Between(1, MAX_STAGES)] = 1,
                 multistage: bool = False, qk_norm: bool = False, z_dims: Sequence[Size] = (),
                 encoder_depth: Blocks = 8, projector_dim: Size = 2048, time_flip: bool = False,
                 stage_scales: Optional[Sequence[Annotated[float, Above(0)]]] = None,
                 decomposition=DECOMPOSITIONS.default(), mlp=MLPS.default(), norm=NORMS.default(),
                 attention=ATTENTIONS.default(), path_type=PATHS.default(), prediction=PREDICTIONS.default(),
                 position_embedding: str = "sincos"):
        super().__init__()
        if not multistage and stages != 1:
            raise ValueError(f"a plain SiT has exactly 1 stage, got stages={stages}; use a DFM-SiT model")
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        if input_size % patch_size != 0:
            raise ValueError(f"input_size {input_size} is not divisible by the patch size {patch_size}")
        tokens, side = (input_size // patch_size) ** 2, int(MAX_TOKENS ** 0.5)
        if tokens > MAX_TOKENS:
            raise ValueError(f"input_size {input_size} with patch {patch_size} makes {tokens:,} tokens, more than "
                             f"the {MAX_TOKENS:,} (a {side}x{side} grid) a model may have; lower input_size or use a "
                             "larger patch")
        if hidden_size % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide hidden_size ({hidden_size})")
        if int(hidden_size * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio {mlp_ratio} gives the MLP int(hidden_size * mlp_ratio) = "
                             f"{int(hidden_size * mlp_ratio)} units; it needs at least 1")
        if z_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}], got {encoder_depth}")
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {list(POSITION_EMBEDDINGS)}, "
                             f"got {position_embedding!r}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.num_stages = stages
        self.multistage = multistage
        self.encoder_depth = encoder_depth
        self.time_flip = time_flip
        self.grid = input_size // patch_size
        # The decomposition the stages live in (with the stage calibration, SPEC §11), the path and
        # the prediction target: training, sampling, calibration and FLOP counting all use these
        # (not used by forward). The decomposition is built on the CPU even inside a meta-device
        # build (`stage_scales: auto` measures data with it); its tensors follow the model's device.
        with torch.device("cpu"):
            self.decomposition = DECOMPOSITIONS.build(decomposition, num_stages=stages, scales=stage_scales)
        self.path = PATHS.build(path_type)
        self.prediction = PREDICTIONS.build(prediction)
        self.stage_scales = self.decomposition.scales
        self.stage_shapes = self.decomposition.level_shapes((in_channels, input_size, input_size))
        patch_sizes = self._stage_patch_sizes()
        self.arch: dict = {}  # filled in by models.create_model

        if multistage:
            channels = [c for c, _, _ in self.stage_shapes]
            self.x_embedder = StagePatchEmbedders(patch_sizes, channels, hidden_size)
            self.t_embedder = StageTimestepEmbedders(stages, hidden_size)
            self.final_layer = StageFinalLayers(patch_sizes, hidden_size, channels)
        else:
            if self.stage_shapes != [(in_channels, input_size, input_size)]:
                raise ValueError(f"a plain SiT needs a one-stage decomposition that keeps the input's shape "
                                 f"({in_channels}, {input_size}, {input_size}), got {self.stage_shapes}")
            self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
            self.t_embedder = TimestepEmbedder(hidden_size)
            self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if position_embedding == "sincos":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, hidden_size), requires_grad=False)
        else:
            self.pos_embed = None
        # (T, 2) float (row, column) of every token (row-major): what block parts see as `positions`.
        # Not a buffer (no state, nothing for DDP to broadcast every step); `_apply` moves it with the model.
        self.token_positions = cpu_constant(grid_positions, self.grid)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, mlp=mlp, norm=norm,
                                              attention=attention) for _ in range(depth)])
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, z) for z in z_dims])
        self.initialize_weights()

    def _stage_patch_sizes(self) -> List[float]:
        """Patch size of every stage: ``p * H_s / H``, so that each stage covers the token grid
        (an integer, or ``1 / k`` for a level that is nearest-upsampled by ``k``)."""
        sizes = []
        for s, (_c, h, w) in enumerate(self.stage_shapes):
            p = self.patch_size * h / self.input_size
            fits = h == w and (float(p).is_integer() or (p < 1 and float(1 / p).is_integer()))
            if not fits or (h / p) != self.grid:
                raise ValueError(f"stage {s} of the decomposition is {h}x{w}, which does not cover the "
                                 f"{self.grid}x{self.grid} token grid of patch {self.patch_size} on "
                                 f"{self.input_size}x{self.input_size} inputs with a whole (or 1/k) patch size")
            sizes.append(p)
        return sizes

    # tensors that are constants of the architecture (no state, never broadcast), moved with the model
    constant_tensors = ("token_positions",)

    def _apply(self, fn, recurse=True):
        """``.to()`` / ``.cuda()`` also move the :attr:`constant_tensors`."""
        out = super()._apply(fn, recurse)
        for name in self.constant_tensors:
            setattr(self, name, fn(getattr(self, name)))
        return out

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """Xavier Linears, zero biases, N(0, 0.02) label table and timestep MLPs, adaLN-Zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.pos_embed is not None:
            self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.hidden_size, self.grid)).float()[None])
        for module in self.modules():
            if isinstance(module, PatchEmbed):
                weight = module.proj.weight.data
                nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
                nn.init.zeros_(module.proj.bias)
            elif isinstance(module, TimestepEmbedder):
                nn.init.normal_(module.mlp[0].weight, std=0.02)
                nn.init.normal_(module.mlp[2].weight, std=0.02)
            elif isinstance(module, (SiTBlock, FinalLayer)):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
            if isinstance(module, FinalLayer):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    # --------------------------------------------------------------- forward
    def forward(self, xs: Union[torch.Tensor, Sequence[torch.Tensor]], t: torch.Tensor, y: torch.Tensor,
                active: Optional[torch.Tensor] = None, return_features: bool = False,
                inference_budget=None):
        """Velocities for every stage.

        xs: list of S tensors (B, C_s, H_s, W_s) (``stage_shapes``), stage 0 coarsest (a plain
            tensor when S = 1, which then returns a plain tensor); t: (B, S) or (B,) raw times in [0, 1];
            y: (B,) labels (``num_classes`` = null); active: None, (S,) or (B, S) bool;
            inference_budget: ELIT models only (see ``models.elit_sit``); must be None here.
        Returns the list of S velocities, and with ``return_features`` also the list of REPA
        projector outputs (B, T, z_dim).
        """
        single = torch.is_tensor(xs)
        if single:
            xs = [xs]
        S = self.num_stages
        if len(xs) != S:
            raise ValueError(f"model has {S} stages but got {len(xs)} inputs")
        B = xs[0].shape[0]
        t = t.reshape(B, S) if t.dim() == 1 else t
        if active is None:
            active = torch.ones(B, S, dtype=torch.bool, device=xs[0].device)
        elif active.dim() == 1:
            active = active[None].expand(B, S)
        t = torch.where(active, t, torch.ones_like(t))  # inactive stages sit at pure noise
        if self.time_flip:  # official SiT checkpoints: t = 0 is noise, velocity points to data
            t = 1 - t
        gate = active.to(xs[0].dtype)
        xs = [x * gate[:, s].view(B, 1, 1, 1) for s, x in enumerate(xs)]

        if self.multistage:
            tokens = self.x_embedder(xs)
            c = self.t_embedder(t)
        else:
            tokens = self.x_embedder(xs[0])
            c = self.t_embedder(t[:, 0])
        x = tokens + self.pos_embed if self.pos_embed is not None else tokens
        c = c + self.y_embedder(y)
        x, zs = self.run_blocks(x, c, return_features, inference_budget)
        if self.multistage:
            outputs = self.final_layer(x, c, self.grid)
        else:
            outputs = [unpatchify(self.final_layer(x, c), self.patch_size, self.in_channels, self.grid)]
        if self.time_flip:
            outputs = [-o for o in outputs]
        result = outputs[0] if single else outputs
        return (result, zs) if return_features else result

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor, return_features: bool, inference_budget=None):
        """Transformer blocks on tokens x (B, T, D) with conditioning c (B, D) -> (x, REPA features).

        The REPA projectors read the output of block ``encoder_depth``. ELIT models override this.
        """
        if inference_budget is not None:
            raise ValueError(f"inference_budget={inference_budget!r} given, but {self.arch.get('name', 'this model')} "
                             "has no compute budget (only ELIT-SiT / DFM-ELIT-SiT models take one); "
                             "leave inference_budget unset")
        zs: List[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x, c, self.token_positions)
            if return_features and i + 1 == self.encoder_depth:
                zs = self.project(x)
        return x, zs

    def project(self, x: torch.Tensor) -> List[torch.Tensor]:
        """REPA projector outputs (B, T, z_dim) of tokens x (B, T, D)."""
        return [projector(x) for projector in self.projectors]

"""Analytic FLOP counts of one SiT / DFM-SiT forward pass (matmul FLOPs = 2 x multiply-adds).

Counted: every Linear/conv matmul and the two attention matmuls (QK^T and AV). Not counted:
normalisations, activations, softmax, elementwise ops (a few per cent of the total at most).
"""
from __future__ import annotations


def forward_flops_per_image(model) -> int:
    """FLOPs of one forward pass for one image (all stages active, no CFG doubling)."""
    D = model.hidden_size
    T = model.grid * model.grid
    depth = len(model.blocks)
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    macs = 0
    # transformer blocks: qkv + proj + MLP per token, attention T x T, adaLN per image
    per_block = T * (3 * D * D + D * D + 2 * D * mlp_hidden) + 2 * T * T * D + D * 6 * D
    macs += depth * per_block
    # patch embedders (one per stage) and output heads (one per stage)
    C = model.in_channels
    if model.multistage:
        patches = [max(1, int(p)) for p in model.x_embedder.patch_sizes]
        num_t_embedders = len(model.t_embedder.embedders)
    else:
        patches = [model.patch_size]
        num_t_embedders = 1
    for p in patches:
        macs += T * (C * p * p) * D  # patch embedding conv
        macs += T * D * (p * p * C) + D * 2 * D  # head linear + head adaLN
    macs += num_t_embedders * (256 * D + D * D)  # timestep MLPs
    for projector in getattr(model, "projectors", []):
        macs += T * sum(layer.in_features * layer.out_features for layer in projector if hasattr(layer, "in_features"))
    return 2 * macs


def training_flops_per_image(model) -> int:
    """The usual 3 x forward (forward + backward of activations and weights)."""
    return 3 * forward_flops_per_image(model)

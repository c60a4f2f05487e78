"""FLOP counts of one forward pass (matmul FLOPs = 2 x multiply-adds).

``forward_flops_per_image``: analytic, SiT / DFM-SiT. Counted: every Linear/conv matmul and the
two attention matmuls (QK^T and AV). Not counted: normalisations, activations, softmax,
elementwise ops (a few per cent of the total at most).
``counted_forward_flops``: any model incl. ELIT at a budget, counted op by op with
``torch.utils.flop_counter`` (the same matmuls, attention included).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def counted_forward_flops(model, inference_budget=None, batch_size: int = 1) -> int:
    """FLOPs of one forward pass on ``batch_size`` images (all stages active, no CFG doubling) at
    ``inference_budget`` (ELIT models; None: the model's default budget).

    Runs on a meta-device twin rebuilt from ``model.arch`` (no memory, no compute; instant even
    for XL models); a model without ``arch`` is run itself on dummy inputs.
    """
    if getattr(model, "arch", None):
        from models.registry import skeleton_model

        model = skeleton_model(**model.arch)
        device, dtype = torch.device("meta"), torch.float32
    else:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    was_training = model.training
    model.eval()
    xs = [torch.zeros(batch_size, model.in_channels, s, s, device=device, dtype=dtype) for s in model.stage_sizes]
    t = torch.full((batch_size, model.num_stages), 0.5, device=device, dtype=dtype)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    kwargs = {} if inference_budget is None else {"inference_budget": inference_budget}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(xs, t, y, **kwargs)
    model.train(was_training)
    return int(counter.get_total_flops())


def forward_flops_per_image(model) -> int:
    """FLOPs of one forward pass for one image (all stages active, no CFG doubling)."""
    if hasattr(model, "kept_latents"):
        raise ValueError("ELIT models: the analytic count does not know the latent interface; use "
                         "counted_forward_flops(model, inference_budget)")
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

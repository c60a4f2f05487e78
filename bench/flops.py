"""FLOP counts of one forward pass (matmul FLOPs = 2 x multiply-adds), counted op by op.

``counted_forward_flops`` runs the model's meta-device twin under ``torch.utils.flop_counter``:
every Linear/conv matmul and the two attention matmuls (QK^T and AV), of whatever block parts,
decomposition and ELIT budget the model has -- there is no formula that assumes parameter names.
Not counted: normalisations, activations, softmax, elementwise ops (a few per cent at most).
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
    xs = [torch.zeros(batch_size, *shape, device=device, dtype=dtype) for shape in model.stage_shapes]
    t = torch.full((batch_size, model.num_stages), 0.5, device=device, dtype=dtype)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    kwargs = {} if inference_budget is None else {"inference_budget": inference_budget}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(xs, t, y, **kwargs)
    model.train(was_training)
    return int(counter.get_total_flops())


def forward_flops_per_image(model, inference_budget=None) -> int:
    """FLOPs of one forward pass for one image (all stages active, no CFG doubling), counted: the
    same for every block part, decomposition and ELIT budget (see :func:`counted_forward_flops`)."""
    return counted_forward_flops(model, inference_budget)


def training_flops_per_image(model, inference_budget=None) -> int:
    """The usual 3 x forward (forward + backward of activations and weights)."""
    return 3 * forward_flops_per_image(model, inference_budget)

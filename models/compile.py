"""torch.compile for training and sampling alike: the one place that decides what is compiled.

Regional compilation: every transformer block (``SiTBlock``) and ELIT's Read and Write adapters
are compiled in place (``nn.Module.compile``); embedders, heads, the budget rule and the
objective stay eager Python. Blocks share one code object, so one graph serves all 12-28 blocks
of a model, its EMA copy and every later model in the process (a resumed run compiles nothing
new). What a block sees does not depend on DFM's stage draw, the active mask, the step or the
learning rate, so none of these recompiles. Measured on a CPU with inductor
(docs/PERFORMANCE.md, "CPU (inductor)"), regional compilation compiles several times faster
than compiling the whole model, which also has to compile one graph per ELIT budget (the budget
is a Python number in its forward), at about the same step time.

ELIT budgets: the core blocks see ``W * k`` latents (``k`` per window). Dynamo's automatic
dynamic shapes make that dimension symbolic at the second size it sees, so one dynamic graph
serves every budget level (measured: as fast per step as one static graph per level, at a
fraction of the compile time). The recompile limit is still raised deliberately, from the
model's number of levels (:func:`graphs_per_block`), so that even one graph per level (a torch
that specialises the size again) compiles every level instead of silently running the rest
eagerly after dynamo's default of 8.
"""
from __future__ import annotations

import torch
from torch import nn

BACKEND = "inductor"
# Per grad mode (training with gradients, sampling without), the graphs a block may need besides
# one per budget level: the full token grid, a batch size that changes (CFG's doubled batch, the
# last partial batch of a sampling run) and its dynamic version.
_SPARE_GRAPHS = 3


def compiled_regions(model: nn.Module) -> list:
    """The modules :func:`compile_model` compiles: the transformer blocks, and ELIT's Read/Write."""
    from models.elit import LatentRead, LatentWrite
    from models.blocks import SiTBlock

    return [m for m in model.modules() if isinstance(m, (SiTBlock, LatentRead, LatentWrite))]


def graphs_per_block(model: nn.Module) -> int:
    """An upper bound of the graphs dynamo may keep for the block code: for training and for
    sampling, one per ELIT budget level (a model without budgets has one) plus spares."""
    from models.elit import budget_levels

    levels = max(1, len(budget_levels(model)))
    return 2 * (levels + _SPARE_GRAPHS)


def compile_model(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Compile ``model``'s regions in place (see the module docstring) and raise dynamo's
    recompile limit to what the model needs; returns ``model``. Weights, ``state_dict`` keys
    and the module tree are unchanged. Compilation happens at the first call of each region."""
    needed = graphs_per_block(model)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, needed)
    # every block of every compiled model shares the code object, hence this limit too
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * needed)
    for region in compiled_regions(model):
        region.compile(backend=backend or BACKEND)
    return model

"""Whether a training checkpoint is fit to resume from: the fields a resumed run uses, checked once.

`training.checkpoint.load_checkpoint` proves a file is complete (checksum, required keys, `steps`);
this proves its contents are usable: weights that are state dicts of finite tensors, an EMA of the
model's shapes, an arch that builds the model the weights fill, a config that is a mapping, an
optimizer state and skipped-step counters of the right kinds. `resume=auto` rejects a checkpoint that
fails and falls back to the previous one (`select_resume_checkpoint(..., check=check_resume_state)`);
an explicit `resume=FILE` that fails is one ConfigError (training.setup.resume_target). Whether the
checkpoint fits *this run's* config (the same architecture, stage scales, ...) is checked later, by
the pieces that compare them.
"""
from __future__ import annotations

import torch

from models.finite import check_finite
from training.nonfinite import SkipGuard


def _kind(value) -> str:
    return type(value).__name__


def _state_dict(state: dict, part: str) -> dict:
    group = state.get(part)
    if not isinstance(group, dict) or not group:
        raise ValueError(f"its '{part}' entry is {'empty' if isinstance(group, dict) else 'a ' + _kind(group)}, "
                         "not a state dict of tensors")
    bad = next((k for k, v in group.items() if not torch.is_tensor(v)), None)
    if bad is not None:
        raise ValueError(f"its {part}[{bad!r}] is a {_kind(group[bad])}, not a tensor")
    return group


def _check_weights(state: dict) -> None:
    model, ema = _state_dict(state, "model"), _state_dict(state, "ema")
    if set(model) != set(ema):
        only_model, only_ema = sorted(set(model) - set(ema)), sorted(set(ema) - set(model))
        parts = ([f"only the model has {', '.join(only_model[:3])}"] if only_model else []) + \
                ([f"only the EMA has {', '.join(only_ema[:3])}"] if only_ema else [])
        raise ValueError(f"its model and EMA weights hold different tensors ({'; '.join(parts)})")
    wrong = next((k for k in model if model[k].shape != ema[k].shape), None)
    if wrong is not None:
        raise ValueError(f"its ema[{wrong!r}] has shape {tuple(ema[wrong].shape)}, the model's "
                         f"{tuple(model[wrong].shape)}")
    if "arch" in state:
        from models.checkpoints import check_state_dict_fits, stored_arch
        from models.registry import canonical_arch, skeleton_for_weights

        arch = stored_arch(state)
        if arch is None:
            raise ValueError(f"its 'arch' entry is a {_kind(state['arch'])}, not a mapping of model options")
        try:
            canonical_arch(arch)
        except ValueError as error:
            raise ValueError(f"its arch cannot be built: {error}") from None
        try:
            check_state_dict_fits(skeleton_for_weights(arch, model), model)
        except ValueError as error:
            raise ValueError(f"its arch ({arch.get('name')}) and weights do not go together: {error}") from None
    check_finite(model, "its model weights")
    check_finite(ema, "its EMA weights")


def check_resume_state(state: dict) -> None:
    """ValueError (one line naming the damaged field, without the file's name) unless `state`, a
    checkpoint that `training.checkpoint.load_checkpoint` read, can be resumed from."""
    _check_weights(state)
    if "config" in state and not isinstance(state["config"], dict):
        raise ValueError(f"its 'config' entry is a {_kind(state['config'])}, not a mapping of the run's settings")
    opt = state.get("opt")
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        raise ValueError(f"its 'opt' entry is not an optimizer state dict (a mapping with 'state' and 'param_groups'), "
                         f"found a {_kind(opt)}")
    SkipGuard.check_state(state.get("nonfinite"))

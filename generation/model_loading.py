"""Load the model to sample from, and the training config stored beside its weights."""

from __future__ import annotations


import torch

from .config import GenerationError


def load_sampling_model(ckpt: str, model_name: str | None, use_ema: bool, device: torch.device,
                        trust_checkpoint: bool = False, foreign_options: dict | None = None):
    """The model in eval mode on `device`, and the checkpoint's training config (or None).

    Our checkpoints are rebuilt from their stored `arch`; published ones (REPA, official SiT,
    reference DFM-SiT) from `model_name` or, when that is None, from the weights' shapes, with
    `foreign_options` (arch options the weights cannot tell: `path_type`, `prediction`; None
    values skipped) applied.
    A checkpoint that does not fit the requested architecture ends in one GenerationError.
    The file is read once (memory-mapped), safely: no code in it runs unless
    `trust_checkpoint` (generate.py --trust-checkpoint) allows full unpickling.
    """
    from models import model_from_checkpoint, read_checkpoint
    from models.checkpoints import stored_arch
    from models.finite import NonFiniteWeightsError

    try:
        checkpoint = read_checkpoint(ckpt, trust_checkpoint=trust_checkpoint)
    except (FileNotFoundError, ValueError) as error:
        raise GenerationError(str(error)) from None
    if not isinstance(checkpoint, dict):
        raise GenerationError(f"checkpoint {ckpt} holds a {type(checkpoint).__name__}, not a dict of weights")
    arch = stored_arch(checkpoint)
    train_config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else None
    if arch is not None and model_name is not None and model_name != arch.get("name"):
        raise GenerationError(
            f"checkpoint {ckpt} holds a {arch.get('name')} model, but model={model_name} was asked "
            f"for; drop the model key (our checkpoints store their architecture) or pass the "
            f"checkpoint of a {model_name}")
    name = None if arch is not None else model_name
    options = {} if arch is not None else {k: v for k, v in (foreign_options or {}).items() if v is not None}
    try:
        model = model_from_checkpoint(checkpoint, name=name, prefer_ema=use_ema, **options)
    except NonFiniteWeightsError as error:
        raise GenerationError(f"checkpoint {ckpt}: {error}") from None
    except (ValueError, RuntimeError, KeyError) as error:
        what = f"the architecture {model_name}" if name else "the architecture its weights describe"
        raise GenerationError(f"cannot load checkpoint {ckpt} as {what}: {error}") from None
    return model.to(device).eval(), train_config

"""Load the model to sample from, and the training config stored beside its weights."""

from __future__ import annotations

import os

import torch

from .config import GenerationError


def read_stored_config(path: str) -> tuple[dict | None, dict | None]:
    """(arch, training config) stored in one of our checkpoints; (None, None) for published ones.

    Memory-maps the file, so the weights are not read twice.
    """
    if not os.path.isfile(path):
        raise GenerationError(f"checkpoint not found: {path}")
    checkpoint = None
    for kwargs in ({"mmap": True, "weights_only": True}, {"mmap": True, "weights_only": False},
                   {"weights_only": False}):
        try:
            checkpoint = torch.load(path, map_location="cpu", **kwargs)
            break
        except Exception as error:  # noqa: BLE001 - each loader variant may fail differently
            last = error
    if checkpoint is None:
        raise GenerationError(f"cannot read checkpoint {path}: {type(last).__name__}: {last} "
                              "(truncated, or not a PyTorch checkpoint?)")
    if not isinstance(checkpoint, dict):
        raise GenerationError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of weights")
    arch = checkpoint.get("arch") if isinstance(checkpoint.get("arch"), dict) else None
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else None
    return arch, config


def load_sampling_model(ckpt: str, model_name: str | None, use_ema: bool, device: torch.device):
    """The model in eval mode on `device`, and the checkpoint's training config (or None).

    Our checkpoints are rebuilt from their stored `arch`; published ones (REPA, official SiT,
    reference DFM-SiT) from `model_name` or, when that is None, from the weights' shapes.
    A checkpoint that does not fit the requested architecture ends in one GenerationError.
    """
    from models import load_pretrained

    arch, train_config = read_stored_config(ckpt)
    if arch is not None and model_name is not None and model_name != arch.get("name"):
        raise GenerationError(
            f"checkpoint {ckpt} holds a {arch.get('name')} model, but model={model_name} was asked "
            f"for; drop the model key (our checkpoints store their architecture) or pass the "
            f"checkpoint of a {model_name}")
    name = None if arch is not None else model_name
    try:
        model = load_pretrained(ckpt, name=name, prefer_ema=use_ema)
    except (ValueError, RuntimeError, KeyError, FileNotFoundError) as error:
        what = f"the architecture {model_name}" if name else "the architecture its weights describe"
        raise GenerationError(f"cannot load checkpoint {ckpt} as {what}: {error}") from None
    return model.to(device).eval(), train_config

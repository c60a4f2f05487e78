"""Small helpers about torch modules shared by packages that must not import each other."""
from __future__ import annotations


def inner_module(model):
    """The module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model

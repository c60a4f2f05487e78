"""Loading our checkpoints and the published SiT / REPA / DFM-SiT ones (SPEC §3)."""
from __future__ import annotations

import math
import os
import re
from typing import Dict, Optional

import torch

from models.finite import check_finite
from models.registry import MODEL_NAMES, SIZES, create_model, is_elit, parse_name, skeleton_for_weights, split_arch
from models.weights_io import (UntrustedCheckpointError, describe_globals, is_safetensors, read_weights_file,
                               torch_load_cpu, weights_only_reason)
from utils.checksum import verify_file

_STRIP_PREFIXES = ("module.", "_orig_mod.")
_HEADS_BY_HIDDEN = {cfg["hidden_size"]: cfg["num_heads"] for cfg in SIZES.values()}
_SIZE_BY_DEPTH_HIDDEN = {(cfg["depth"], cfg["hidden_size"]): size for size, cfg in SIZES.items()}
_ELIT_QUERIES = "input_token_editor.adapters.0.learned_query_embed"


def read_checkpoint(path: str, trust_checkpoint: bool = False, verify: bool = True) -> dict:
    """A checkpoint file (``.pt`` or ``.safetensors``) as a dict on CPU, with one clear
    ValueError for an unreadable, damaged or untrusted file (FileNotFoundError when missing).

    ``.pt`` files are read with ``weights_only=True`` (memory-mapped where the format allows):
    no code from the file runs. One that needs full unpickling raises UntrustedCheckpointError
    unless ``trust_checkpoint=True`` (see :mod:`models.weights_io`). ``.safetensors`` files come
    back in the same shape as our ``.pt`` checkpoints. ``verify``: a file with a ``.sha256``
    sidecar is checked against it first (ChecksumMismatchError when it differs).
    """
    if os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path) if name.endswith((".pt", ".safetensors")))
        found = os.path.join(path, "checkpoints")
        if not inside and os.path.isdir(found):
            inside = [os.path.join("checkpoints", n) for n in sorted(os.listdir(found)) if n.endswith(".pt")]
        hint = f" (it holds {', '.join(inside[-3:])})" if inside else ""
        raise FileNotFoundError(f"checkpoint {path} is a folder, not a checkpoint file{hint}; pass the file, e.g. "
                                "exps/RUN/checkpoints/0400000.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if verify:
        verify_file(path)
    try:
        if is_safetensors(path):
            return read_weights_file(path)
        return torch_load_cpu(path, trust_checkpoint)
    except UntrustedCheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - torch and safetensors fail in many ways
        raise ValueError(f"cannot read checkpoint {path}: {type(error).__name__}: {weights_only_reason(error)} "
                         "(truncated or not a PyTorch/safetensors file?)") from error


def read_weights(path: str, what: str) -> dict:
    """A third-party weights file (Inception, DINOv2, a VAE's ``.bin``) as a dict of tensors on CPU.

    Read by :func:`read_checkpoint` (``weights_only=True`` / safetensors), so no code from the
    file runs. Genuine weights hold only tensors, so a file that needs full unpickling is refused
    outright (UntrustedCheckpointError, no trust option); ``what`` names the file's role in the
    messages (``"the Inception weights"``). Other failures: ValueError / FileNotFoundError.
    """
    try:
        state = read_checkpoint(path)
    except UntrustedCheckpointError as error:
        raise UntrustedCheckpointError(
            f"refusing to load {what} {path}: besides tensors the file names Python objects "
            f"({describe_globals(error.names)}), and unpickling them would run code from it (arbitrary code "
            "execution); genuine weights hold only tensors, so download the file again from its source",
            error.names) from None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{what} {path}: holds {'no tensors' if isinstance(state, dict) else type(state).__name__}, "
                         "not a state dict of tensors")
    return state


# Arch options that lived only in the run config before they were options of the model: a stored
# arch without them takes them from the checkpoint's config (the run trained with those values).
_FROM_CONFIG = ("path_type", "prediction")


def stored_arch(checkpoint: dict) -> Optional[dict]:
    """The architecture a checkpoint of ours stores (a copy), completed with the options that older
    versions kept in the run config only (``path_type``, ``prediction``); None for a checkpoint that
    stores none (REPA, official SiT, reference DFM / ELIT)."""
    arch = checkpoint.get("arch") if isinstance(checkpoint, dict) else None
    if not isinstance(arch, dict):
        return None
    arch = dict(arch)
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    for key in _FROM_CONFIG:
        if key not in arch and config.get(key) is not None:
            arch[key] = config[key]
    return arch


def weights_group(checkpoint: dict, prefer_ema: bool = True) -> Optional[str]:
    """Which entry of a checkpoint holds the model weights: ``ema`` (if preferred and present),
    ``model``, ``state_dict``; None when the dict itself is the state dict."""
    order = ("ema", "model", "state_dict") if prefer_ema else ("model", "ema", "state_dict")
    group = next((k for k in order if isinstance(checkpoint.get(k), dict)), None)
    if group == "ema" and not prefer_ema:
        raise ValueError("the checkpoint holds only EMA weights (no raw 'model' weights; e.g. a post-hoc EMA "
                         "reconstruction or an exported EMA), so the raw weights asked for (use_ema=false) are not "
                         "there; sample it with use_ema=true")
    return group


def extract_state_dict(checkpoint: dict, prefer_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The model weights in a checkpoint (the entry :func:`weights_group` names, or the dict itself);
    ``module.`` / ``_orig_mod.`` prefixes removed."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    group = weights_group(checkpoint, prefer_ema)
    state = checkpoint if group is None else checkpoint[group]
    clean = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise ValueError(f"checkpoint entry {key!r} is not a tensor: not a model state dict")
        for prefix in _STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        clean[key] = value
    return clean


def infer_arch(state: Dict[str, torch.Tensor]) -> dict:
    """Guess the architecture (``create_model`` arguments) of a foreign checkpoint (one that stores
    no ``arch``: REPA, official SiT, reference DFM / ELIT) from its keys and shapes, which follow
    the published models' parameter names.

    Official SiT checkpoints (8-channel ``learn_sigma`` heads) are recognised and marked with
    ``official_sit=True``. ELIT checkpoints (reference key names) give an ``ELIT-`` name and their
    ``group_size``; their head/tail depths and budget range are the registry's defaults. The
    attention heads cannot be read from weights: a width that is none of SiT's sizes gets
    ``num_heads=None`` (the caller must give it).
    """
    if "pos_embed" not in state:
        raise ValueError("state dict has no 'pos_embed': not a SiT/DiT-family checkpoint")
    tokens, hidden = state["pos_embed"].shape[-2:]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    multistage = "x_embedder.embedders.0.proj.weight" in state
    if multistage:
        stages = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"x_embedder\.embedders\.(\d+)\.", k)))
        conv = state[f"x_embedder.embedders.{stages - 1}.proj.weight"]
        head = state[f"final_layer.projections.{stages - 1}.linear.weight"]
    else:
        stages = 1
        conv = state["x_embedder.proj.weight"]
        head = state["final_layer.linear.weight"]
    patch, in_channels = conv.shape[-1], conv.shape[1]
    grid = math.isqrt(tokens)
    arch = dict(input_size=grid * patch, in_channels=in_channels,
                num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
                depth=depth, hidden_size=hidden, num_heads=_HEADS_BY_HIDDEN.get(hidden),
                mlp_ratio=_mlp_ratio(state["blocks.0.mlp.fc1.weight"].shape[0], hidden),
                qk_norm="blocks.0.attn.q_norm.weight" in state)
    n_proj = len({m.group(1) for k in state if (m := re.match(r"projectors\.(\d+)\.", k))})
    if n_proj:
        arch["z_dims"] = [state[f"projectors.{i}.4.weight"].shape[0] for i in range(n_proj)]
        arch["projector_dim"] = state["projectors.0.0.weight"].shape[0]
    official = not multistage and head.shape[0] == patch * patch * 2 * in_channels
    size = _SIZE_BY_DEPTH_HIDDEN.get((depth, hidden), "S")
    elit = _ELIT_QUERIES in state
    if elit:  # g^2 learned queries per window; head/tail depths and budgets are not in the weights
        arch["group_size"] = _group_size_from_queries(state[_ELIT_QUERIES].shape[0])
    name = f"{'DFM-' if multistage else ''}{'ELIT-' if elit else ''}SiT-{size}/{patch}"
    if multistage:
        arch["stages"] = stages
    return {"name": name, **arch, "official_sit": official}


def _mlp_ratio(width: int, hidden: int) -> float:
    """The `mlp_ratio` whose `int(hidden * mlp_ratio)` (the block's rule) gives back `width`."""
    ratio = width / hidden
    while int(hidden * ratio) < width:  # width / hidden * hidden may land just below width
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _group_size_from_queries(num_queries: int) -> int:
    g = math.isqrt(num_queries)
    if g * g != num_queries:
        raise ValueError(f"{_ELIT_QUERIES} has {num_queries} rows, not a square g^2: not an ELIT checkpoint")
    return g


def convert_official_sit(state: Dict[str, torch.Tensor], patch_size: int, channels: int = 4) -> dict:
    """Official SiT (``learn_sigma``) heads: keep rows ``k * 2C + c`` (k < p*p, c < C)."""
    state = dict(state)
    rows = torch.tensor([k * 2 * channels + c for k in range(patch_size * patch_size) for c in range(channels)])
    state["final_layer.linear.weight"] = state["final_layer.linear.weight"][rows]
    state["final_layer.linear.bias"] = state["final_layer.linear.bias"][rows]
    return state


def check_state_dict_fits(model, state: Dict[str, torch.Tensor], looks_like: Optional[str] = None) -> None:
    """Raise one ValueError naming missing/unexpected/mis-shaped keys; ``model`` may live on the
    meta device (only its keys and shapes are read)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        def short(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = [f"checkpoint does not match {model.arch.get('name', 'the model')}"]
        if missing:
            parts.append(f"missing keys: {short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {short(unexpected)}")
        if shapes:
            parts.append("shape mismatches: " + short(
                [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]))
        if looks_like:
            parts.append(f"the checkpoint looks like {looks_like}")
        raise ValueError("; ".join(parts))


def load_state_dict_strict(model, state: Dict[str, torch.Tensor], looks_like: Optional[str] = None) -> None:
    """Load weights, raising one ValueError that names missing/unexpected/mis-shaped keys."""
    check_state_dict_fits(model, state, looks_like)
    model.load_state_dict(state)


def load_pretrained(path: str, name: Optional[str] = None, prefer_ema: bool = True, *,
                    trust_checkpoint: bool = False, **overrides):
    """A ready model (eval mode) from a checkpoint file.

    Handles our training checkpoints (rebuilt from their stored ``arch``), REPA checkpoints,
    reference DFM-SiT checkpoints (``{"model"|"ema": ...}`` dicts or plain state dicts) and
    official SiT checkpoints (8-channel head rows dropped, evaluated at ``1 - t`` and negated).
    ``name``/``overrides`` force an architecture; otherwise it is inferred from the weights.
    ``.safetensors`` files are read too; ``trust_checkpoint``: see :func:`read_checkpoint`.
    """
    return model_from_checkpoint(read_checkpoint(path, trust_checkpoint), name, prefer_ema, **overrides)


def _check_elit_name(name: str, guessed: str) -> None:
    """An ELIT checkpoint needs an ELIT name and the other way round (one clear error)."""
    if is_elit(name) == is_elit(guessed):
        return
    if is_elit(guessed):
        allowed = [n for n in MODEL_NAMES if is_elit(n) and n.startswith("DFM-") == guessed.startswith("DFM-")]
        raise ValueError(f"the checkpoint holds ELIT weights (input_token_editor / output_token_editor; it "
                         f"looks like {guessed}), but the model name {name} has no latent interface; "
                         f"allowed names: {', '.join(allowed)} (or no name: inferred from the weights)")
    raise ValueError(f"model name {name} is an ELIT model, but the checkpoint has no ELIT weights "
                     f"(it looks like {guessed}); use a name without 'ELIT-' (or no name)")


def model_from_checkpoint(checkpoint: dict, name: Optional[str] = None, prefer_ema: bool = True, **overrides):
    """:func:`load_pretrained` for a checkpoint already read with :func:`read_checkpoint`.

    A checkpoint that stores its ``arch`` (ours) is rebuilt from it, every option included (stage
    scales, decomposition, block parts); ``name``, when given, must be the stored one. Others are
    rebuilt from ``name`` or :func:`infer_arch`. The architecture is built on the meta device first
    (stopped as soon as it outgrows the tensors) and checked against the tensors' names and shapes,
    so memory is allocated only for a model that the weights fill exactly, and only for weights that
    are finite (:func:`models.finite.check_finite`; NonFiniteWeightsError names the first tensor).
    """
    state = extract_state_dict(checkpoint, prefer_ema)
    stored = stored_arch(checkpoint)
    looks_like = None
    if stored is not None:
        try:
            split_arch(stored)
        except ValueError as error:
            raise ValueError(f"the architecture stored in the checkpoint cannot be read: {error}") from None
        if name is not None and name != stored.get("name"):
            raise ValueError(f"the checkpoint holds a {stored.get('name')} model (its stored arch), not {name}; "
                             "leave the name out (the stored arch has every setting, stage scales included)")
        arch = {**stored, **overrides}
    else:
        guess = infer_arch(state)
        looks_like = guess["name"] + (f" with {guess['stages']} stages" if "stages" in guess else "")
        arch = {k: v for k, v in guess.items() if k != "official_sit"}
        if name is not None:
            _check_elit_name(name, guess["name"])
            arch["name"] = name
            if not parse_name(name)[0]:
                arch.pop("stages", None)
        arch.update(overrides)
        if guess["official_sit"] and not arch.get("time_flip"):
            state = convert_official_sit(state, int(arch["name"].rsplit("/", 1)[1]), guess["in_channels"])
            arch["time_flip"] = True
    heads_unknown = arch.get("num_heads") is None  # shapes do not depend on it: the fit is checked first
    try:
        skeleton = skeleton_for_weights({**arch, "num_heads": 1} if heads_unknown else arch, state,
                                        stored=stored is not None and not overrides)
    except ValueError as error:
        if stored is not None and not overrides and "does not match the checkpoint's tensors" not in str(error):
            raise ValueError(f"the architecture stored in the checkpoint ({stored.get('name')}) cannot be built: "
                             f"{error}") from None
        raise
    check_state_dict_fits(skeleton, state, looks_like)
    group = weights_group(checkpoint, prefer_ema)
    check_finite(state, "the EMA weights" if group == "ema" else "the weights",
                 "use an earlier checkpoint" + (" (or the raw weights: use_ema=false)" if group == "ema" else ""))
    if heads_unknown:
        raise ValueError(f"the checkpoint stores no architecture and its width {arch['hidden_size']} is none of "
                         f"SiT's sizes ({', '.join(str(h) for h in sorted(_HEADS_BY_HIDDEN))}), so its number of "
                         "attention heads cannot be read from the weights; pass it: load_pretrained(path, num_heads=N)")
    model = create_model(**arch)
    model.load_state_dict(state)
    return model.eval()

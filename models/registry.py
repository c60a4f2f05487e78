"""Model names -> architectures: ``[DFM-][ELIT-]SiT-{S,B,L,XL}/{2,4,8}``.

``SiT``: plain flow transformer; ``DFM-``: per-stage patch embedders, timestep embedders and
heads (SPEC §3); ``ELIT-``: the latent interface between head and tail blocks (SPEC §9).
The prefixes compose: ``DFM-ELIT-SiT-XL/2`` is DFM's interfaces on the ELIT backbone.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re

import torch

from models.elit_sit import ELITSiT
from models.sit import SiT
from utils.registry import SpecDefault, check_arguments

SIZES = {  # depth, hidden, heads, REPA encoder_depth
    "S": dict(depth=12, hidden_size=384, num_heads=6, encoder_depth=4),
    "B": dict(depth=12, hidden_size=768, num_heads=12, encoder_depth=4),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, encoder_depth=8),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16, encoder_depth=8),
}
ELIT_ENCODER_DEPTH = 8  # ELIT's head blocks (the REPA argument's default) for every size
ELIT_TAIL_DEPTH = {"S": 2, "B": 2, "L": 4, "XL": 4}
ELIT_WINDOWS_PER_SIDE = 4  # default group_size = grid / 4: 4 at 256 px, 8 at 512 px for /2 models
PATCH_SIZES = (2, 4, 8)
PREFIXES = ("", "DFM-", "ELIT-", "DFM-ELIT-")
MODEL_NAMES = [f"{prefix}SiT-{size}/{p}" for prefix in PREFIXES for size in SIZES for p in PATCH_SIZES]
DEFAULT_DFM_STAGES = 2
# The most parameters (and buffers) a model may have: six times SiT-XL/2, 16 GB of float32 weights per
# copy (training holds about four). A build is sized on the meta device first, so a larger one is one
# ValueError before anything is allocated; raise this for a deliberately larger model.
MAX_PARAMETERS = 4 * 10**9

def _constructor_options(cls) -> dict:
    """{argument: default} of a model class's constructor (its named arguments are the arch options)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name != "self"}


# The arch options: every named constructor argument (a new one with a default needs no code here),
# except the two that the name decides.
SIT_OPTIONS = {k: v for k, v in _constructor_options(SiT).items() if k not in ("patch_size", "multistage")}
OVERRIDES = set(SIT_OPTIONS)
ELIT_OVERRIDES = set(_constructor_options(ELITSiT)) - OVERRIDES - {"patch_size", "multistage"}
ELIT_OPTIONS = {k: v for k, v in _constructor_options(ELITSiT).items() if k in ELIT_OVERRIDES}
_NAME = re.compile(r"^(DFM-)?(ELIT-)?SiT-(S|B|L|XL)/(2|4|8)$")


def _match(name: str):
    match = _NAME.match(str(name))
    if match is None:
        raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    return match


def parse_name(name: str):
    """``"DFM-SiT-XL/2"`` -> ``(True, "XL", 2)`` (multistage, size, patch); unknown names raise a ValueError."""
    match = _match(name)
    return match.group(1) is not None, match.group(3), int(match.group(4))


def is_elit(name: str) -> bool:
    """True for ``ELIT-SiT-*`` and ``DFM-ELIT-SiT-*`` names (unknown names raise a ValueError)."""
    return _match(name).group(2) is not None


def create_model(name: str, **overrides) -> SiT:
    """Build a freshly initialised model by name.

    Overrides are the model constructors' named arguments (``models.sit.SiT``, and for ELIT
    models ``models.elit_sit.ELITSiT``): input_size (full-resolution side; 32 = 256 px latents),
    in_channels (4), num_classes (1000), stages (DFM only, default 2), qk_norm,
    class_dropout_prob (0.1), z_dims (REPA projector output dims), encoder_depth,
    depth/hidden_size/num_heads/mlp_ratio for small experiments, stage_scales (stage calibration,
    SPEC §11), the registry specs ``decomposition`` (dfm/decompositions.py) and ``mlp``, ``norm``,
    ``attention`` (models/blocks.py). ELIT models also take group_size (default: the token grid /
    4), elit_min_mask_prob / elit_max_mask_prob (default 0 / 0: one budget, all latents),
    elit_tail_depth (default 4 for L/XL, 2 for S/B); their encoder_depth (head blocks) defaults to
    8. ``model.arch`` holds the name, the size's settings and the overrides given (registry specs
    in their compact form); ``create_model(**model.arch)`` rebuilds the model.
    """
    multistage, size, patch = parse_name(name)
    elit = is_elit(name)
    config, stages = _model_config(name, overrides)
    cls = ELITSiT if elit else SiT
    kwargs = dict(patch_size=patch, stages=stages, multistage=multistage, **config)
    if torch.empty(0).device.type == "meta":
        with _size_bound(name):
            model = cls(**kwargs)
    else:  # sized on the meta device first: a model too large is refused before anything is allocated
        with torch.device("meta"), _initialisers_off(), _size_bound(name):
            _check_memory(name, cls(**kwargs))
        model = cls(**kwargs)
    allowed = OVERRIDES | ELIT_OVERRIDES if elit else OVERRIDES
    model.arch = {"name": name, "stages": stages, **{k: v for k, v in config.items() if k in allowed}}
    if not multistage:
        model.arch.pop("stages")
    return model


def _model_config(name: str, overrides: dict):
    """(constructor keyword arguments, stages) of ``name`` with ``overrides``: the size's settings,
    ELIT's defaults, the overrides (None = default) in their stored form. Every option is checked
    against the model constructors' annotated types and ranges (``models.sit.SiT``,
    ``models.elit_sit.ELITSiT``): the one check of the command line, YAML and stored archs alike.
    ValueError (one line naming the option) for an unknown option or a value out of its range."""
    if not isinstance(name, str):
        raise ValueError(f"the model name must be a string such as 'SiT-XL/2', got {name!r}")
    multistage, size, patch = parse_name(name)
    elit = is_elit(name)
    allowed = OVERRIDES | ELIT_OVERRIDES if elit else OVERRIDES
    unknown = set(overrides) - allowed
    if unknown:
        extra = f" ({', '.join(sorted(ELIT_OVERRIDES))} only for ELIT models)" if unknown & ELIT_OVERRIDES else ""
        raise ValueError(f"unknown model option(s) {sorted(unknown, key=str)} for {name}{extra}; "
                         f"allowed: {sorted(allowed)}")
    overrides = check_arguments(SiT, {k: v for k, v in overrides.items() if v is not None}, "model option")
    if elit:
        overrides = check_arguments(ELITSiT, overrides, "model option")
    stages = overrides.pop("stages", DEFAULT_DFM_STAGES if multistage else 1)
    if not multistage and stages != 1:
        raise ValueError(f"stages={stages} is not allowed for {name}: SiT models have 1 stage; "
                         f"use DFM-{name} for a multi-stage model")
    config = dict(SIZES[size])
    if elit:
        config.update(encoder_depth=ELIT_ENCODER_DEPTH, elit_tail_depth=ELIT_TAIL_DEPTH[size],
                      elit_min_mask_prob=0.0, elit_max_mask_prob=0.0)
    config.update(overrides)
    for key, default in SIT_OPTIONS.items():  # registry specs: stored compactly, checked here
        if isinstance(default, SpecDefault) and key in config:
            config[key] = default.registry.compact(config[key])
    if elit and "group_size" not in config:
        config["group_size"] = _default_group_size(config.get("input_size", 32), patch)
    return config, stages


def split_arch(arch) -> tuple:
    """``(name, options)`` of an arch dict (a stored ``arch``, ``model.arch``); ValueError when it is
    not a mapping with a model ``name`` (a damaged or edited checkpoint)."""
    if not isinstance(arch, dict):
        raise ValueError(f"an architecture is a mapping with a model 'name' and options, got {type(arch).__name__}")
    options = {str(k): v for k, v in arch.items()}
    if "name" not in options:
        raise ValueError(f"the architecture has no model 'name' (one of e.g. SiT-XL/2, DFM-SiT-B/2; its other "
                         f"fields: {', '.join(sorted(options)) or 'none'})")
    return options.pop("name"), options


def canonical_arch(arch: dict) -> dict:
    """Every option of ``arch`` with its default filled in and registry specs in full: two arch
    dicts build the same model exactly when their canonical forms are equal, so an option added
    later (with a default that keeps the old behaviour) leaves older checkpoints' arch equal."""
    name, arch = split_arch(arch)
    config, stages = _model_config(name, arch)
    defaults = dict(SIT_OPTIONS)
    if is_elit(name):
        defaults.update(ELIT_OPTIONS)
    full = {"name": name, "stages": stages}
    for key, default in defaults.items():
        if key == "stages":
            continue
        value = config.get(key, default)
        if isinstance(default, SpecDefault):
            value = default.registry.canonical(value)
        elif isinstance(value, (list, tuple)):
            value = [float(v) if isinstance(v, float) else v for v in value]
        full[key] = value
    return full


def arch_differences(old: dict, new: dict) -> list:
    """``["key: old -> new", ...]`` for the options on which two arch dicts disagree (canonical forms)."""
    a, b = canonical_arch(old), canonical_arch(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _default_group_size(input_size: int, patch: int) -> int:
    grid = input_size // patch
    if grid % ELIT_WINDOWS_PER_SIDE:
        raise ValueError(f"no default group_size for a {grid}x{grid} token grid (the default makes "
                         f"{ELIT_WINDOWS_PER_SIDE}x{ELIT_WINDOWS_PER_SIDE} windows); set group_size to a "
                         f"divisor of {grid}")
    return grid // ELIT_WINDOWS_PER_SIDE


@contextlib.contextmanager
def _initialisers_off():
    """torch.nn.init's in-place initialisers as no-ops. On the meta device there are no values to
    set, and running them costs the one-time import of torch's Python reference kernels (4-16 s on
    a busy 2-core machine) for nothing."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def skeleton_model(name: str, **overrides) -> SiT:
    """``create_model`` on the meta device, without initialising anything: the parameter names and
    shapes (and FLOP counts) of an architecture at no memory and almost no time."""
    with torch.device("meta"), _initialisers_off():
        return create_model(name, **overrides)


@contextlib.contextmanager
def _on_registration(check):
    """Call ``check(module, name, tensor)`` for every parameter and buffer a model build registers
    (inside this block): a check that raises stops the build there."""
    from torch.nn.modules import module as torch_module

    def hook(module, name, tensor):
        if tensor is not None:
            check(module, name, tensor)

    handles = [torch_module.register_module_parameter_registration_hook(hook),
               torch_module.register_module_buffer_registration_hook(hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _size_bound(name: str):
    """Stop a build (one ValueError) once its parameters and buffers exceed :data:`MAX_PARAMETERS`:
    whatever option makes a model huge (width, label table, a block part's own size), with no
    formula per option."""
    total = [0]

    def check(module, tensor_name, tensor):
        total[0] += tensor.numel()
        if total[0] > MAX_PARAMETERS:
            raise ValueError(f"{name} with these options has more than {MAX_PARAMETERS:,} parameters (the limit, "
                             f"models.registry.MAX_PARAMETERS; exceeded at {type(module).__name__}.{tensor_name} of "
                             f"{tensor.numel():,} values), so no model was built; check the sizes (hidden_size, depth, "
                             "num_classes, input_size, mlp_ratio)")

    return _on_registration(check)


def _machine_memory() -> int:
    """Bytes of physical memory (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _check_memory(name: str, skeleton) -> None:
    """ValueError when the weights of ``skeleton`` (a meta-device twin) exceed the machine's memory."""
    tensors = list(skeleton.parameters()) + list(skeleton.buffers())
    need, have = sum(t.numel() * t.element_size() for t in tensors), _machine_memory()
    if have and need > have:
        raise ValueError(f"{name} with these options has {sum(t.numel() for t in tensors):,} parameters, "
                         f"{need / 2**30:.1f} GiB of weights, more than this machine's {have / 2**30:.1f} GiB of "
                         "memory, so no model was built; check the sizes (hidden_size, depth, num_classes, input_size)")


@contextlib.contextmanager
def _bounded_by(state: dict, arch: dict, stored: bool):
    """Stop a model build as soon as it registers far more parameters and buffers than ``state``
    holds tensors (twice as many, plus 16), or one far larger than the largest of them (16 times):
    an edited ``arch`` (``depth: 1000``, a 10^6-row label table) ends in one ValueError after a few
    meta-device modules, whatever option was edited (no list of options or parameter names). A
    plausible mismatch gets through, to be named key by key (``check_state_dict_fits``)."""
    limit, largest = 2 * len(state) + 16, 16 * max((t.numel() for t in state.values()), default=0)
    count = [0]

    def check(module, name, tensor):
        count[0] += 1
        if count[0] > limit or tensor.numel() > largest:
            what = (f"more tensors than twice the {len(state)} the checkpoint holds" if count[0] > limit else
                    f"a {type(module).__name__}.{name} of {tensor.numel():,} values, far more than the checkpoint's "
                    f"largest tensor ({largest // 16:,})")
            whose = "stored in the checkpoint" if stored else "asked for"
            why = "; its arch metadata is damaged or was edited" if stored else ""
            raise ValueError(f"the architecture {whose} ({arch.get('name')}) does not match the checkpoint's "
                             f"tensors: it builds {what}{why}, so no model was built")

    with _on_registration(check):
        yield


def skeleton_for_weights(arch: dict, state: dict, stored: bool = True) -> SiT:
    """:func:`skeleton_model` of ``arch``, stopped early (one ValueError) when it builds far more or
    far larger tensors than the state dict ``state`` holds; ``stored``: the arch came with the
    checkpoint (else the caller asked for it). A model that gets through still has to match the
    names and shapes (``models.checkpoints.check_state_dict_fits``)."""
    name, options = split_arch(arch)
    with _bounded_by(state, arch, stored):
        return skeleton_model(name, **options)

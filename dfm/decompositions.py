"""Multi-scale decompositions of images or latents into S stages (SPEC §2), chosen by name.

A decomposition splits ``x`` (B, C, H, W) into S levels, stage 0 the coarsest, and merges them
back exactly. The model owns one (``model.decomposition``, built from its ``arch``), and
training, sampling, previews, evaluation, calibration (``stage_scales: auto``) and FLOP counting
all ask the model for it, so they cannot disagree.

A new decomposition is one class here, registered by name::

    @DECOMPOSITIONS.register("my_wavelet")
    class MyWavelet(Decomposition):
        def __init__(self, num_stages: int, levels_per_octave: int = 1): ...
        def level_shapes(self, shape): ...   # [(C_s, H_s, W_s)], coarsest first
        def split(self, x): ...              # x -> unscaled levels
        def merge(self, levels): ...         # unscaled levels -> x

and is selected with ``decomposition: my_wavelet`` (or ``{name: my_wavelet, levels_per_octave:
2}``) in a training config; its name and parameters are stored in the model's ``arch``. The base
class applies the stage calibration (SPEC §11): level s is multiplied by ``c_s`` right after
``split`` and divided by it right before ``merge``; ``split`` also defines the level energies
that ``auto`` measures. Every level must map onto the model's token grid: level s of side
``H_s`` is embedded with patch ``p * H_s / H`` (nearest-upsampled where that is below 1).

The contract the base class keeps for every decomposition:

- it is built on the CPU even when the model is built on the meta device (the skeletons that
  ``stage_scales: auto`` measures data with and that FLOPs are counted on): ``SiT`` builds it
  inside ``torch.device("cpu")``, so tensors made in ``__init__`` (a blur kernel) hold values;
- tensors it holds as attributes follow the data: every public method (``decompose``,
  ``recompose``, ``recompose_first``, ``levels``) first moves them to the input's device, so a
  decomposition works wherever the model and its data are (GPU, CPU) with no code of its own;
- it holds no trained state: an ``nn.Parameter`` or ``nn.Module`` attribute is refused with one
  line (checkpoints hold the model's weights only; a decomposition is rebuilt from its spec).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from utils.modules import inner_module
from utils.registry import Registry

DECOMPOSITIONS = Registry("decomposition", default="laplacian", context=("num_stages", "scales"))

Shape = Tuple[int, int, int]


def check_stage_scales(scales, num_stages: int) -> Optional[List[float]]:
    """None, or ``scales`` as a list of ``num_stages`` positive finite float32-representable numbers
    (ValueError otherwise)."""
    if scales is None:
        return None
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
        raise ValueError(f"stage_scales must be null or a list of {num_stages} positive numbers, got {scales!r}")
    if len(scales) != num_stages:
        raise ValueError(f"stage_scales needs one entry per stage ({num_stages}), got {list(scales)}")
    try:
        values = [float(c) for c in scales]
    except (TypeError, ValueError):
        raise ValueError(f"stage_scales must be numbers, got {list(scales)}") from None
    if any(isinstance(c, bool) for c in scales) or not all(math.isfinite(c) and c > 0 for c in values):
        raise ValueError(f"stage_scales must be positive finite numbers, got {list(scales)}")
    with np.errstate(over="ignore", under="ignore"):
        as_float32 = np.asarray(values, dtype=np.float32)
    if not (np.isfinite(as_float32).all() and (as_float32 > 0).all()):
        raise ValueError(f"stage_scales {list(scales)}: the levels are scaled in float32, which holds positive "
                         f"numbers from {torch.finfo(torch.float32).tiny:.3g} to {torch.finfo(torch.float32).max:.3g} "
                         "only; choose scales in that range (the study's are about 1 to 16)")
    return values


class Decomposition:
    """Base class: the stage calibration and the size checks around a subclass's ``split``/``merge``.

    Subclasses implement :meth:`level_shapes`, :meth:`split` and :meth:`merge`, and may override
    :meth:`merge_first` (a preview of the first levels; the default merges them with zero finer
    levels at full resolution).
    """

    def __init__(self, num_stages: int, scales: Optional[Sequence[float]] = None):
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")
        self.num_stages = num_stages
        self.scales = check_stage_scales(scales, num_stages)

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, (torch.nn.Parameter, torch.nn.Module)):
            raise ValueError(f"decomposition {type(self).__name__}: attribute {name!r} is a {type(value).__name__}; "
                             "a decomposition holds no trained state (keep plain tensors: they follow the data's "
                             "device), see dfm/decompositions.py")
        if torch.is_tensor(value) and value.device.type != "meta":  # the copy with values, whatever device it moves to
            vars(self).setdefault("_held", {})[name] = value
        object.__setattr__(self, name, value)

    def _follow(self, device: torch.device) -> None:
        """Put the tensors this decomposition holds on ``device`` (the contract in the module docstring);
        copies are made from the tensors as set, so a pass on the meta device loses no values."""
        held = vars(self).get("_held", {})
        for name, value in list(vars(self).items()):
            if torch.is_tensor(value) and value.device != device:
                source = held.get(name)
                if source is None:
                    raise ValueError(f"decomposition {type(self).__name__}: tensor {name!r} was made on the meta "
                                     "device and holds no values; build the decomposition outside a meta-device "
                                     "context (models build theirs on the CPU)")
                object.__setattr__(self, name, source.to(device))

    # ------------------------------------------------------------------ to implement
    def level_shapes(self, shape: Shape) -> List[Shape]:
        """Per-stage ``(C_s, H_s, W_s)`` of an input ``(C, H, W)``, coarsest first (ValueError if it does not fit)."""
        raise NotImplementedError

    def split(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, C, H, W) -> the S unscaled levels (B, C_s, H_s, W_s), coarsest first."""
        raise NotImplementedError

    def merge(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split`."""
        raise NotImplementedError

    def merge_first(self, levels: Sequence[torch.Tensor], n: int) -> torch.Tensor:
        """An image of the first ``n`` of the S unscaled ``levels`` (a coarse preview): here the
        merge with the finer levels set to zero, at full resolution."""
        return self.merge(list(levels[:n]) + [torch.zeros_like(level) for level in levels[n:]])

    # ------------------------------------------------------------------ provided
    def check_shape(self, shape: Shape) -> None:
        """Raise a ValueError unless an input of ``(C, H, W)`` decomposes into this many stages."""
        self.level_shapes(tuple(int(v) for v in shape))

    def levels(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, C, H, W) -> the S unscaled levels (what ``stage_scales: auto`` measures)."""
        self.check_shape(x.shape[1:])
        self._follow(x.device)
        return self.split(x)

    def decompose(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, C, H, W) -> the S levels as the stages see them (``c_s * P_s`` with stage scales)."""
        levels = self.levels(x)
        if self.scales is not None:
            levels = [level * c for level, c in zip(levels, self.scales)]
        return levels

    def _unscaled(self, levels: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if self.scales is None:
            return list(levels)
        return [level / c for level, c in zip(levels, self.scales)]

    def recompose(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`decompose`: the S stage tensors (coarsest first) -> (B, C, H, W)."""
        if len(levels) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} levels, got {len(levels)}")
        self._follow(levels[0].device)
        return self.merge(self._unscaled(levels))

    def recompose_first(self, levels: Sequence[torch.Tensor], n: int) -> torch.Tensor:
        """The image of the first ``n`` of the S stage tensors (the sampler's preview after stage n - 1)."""
        if len(levels) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} levels, got {len(levels)}")
        if n == self.num_stages:
            return self.recompose(levels)
        self._follow(levels[0].device)
        return self.merge_first(self._unscaled(levels[:n]) + list(levels[n:]), n)


# --------------------------------------------------------------------------- Laplacian pyramid
def down(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x1/2 (align_corners=False, no antialias). (B, C, H, W) -> (B, C, H/2, W/2).

    For an exact halving this is 2x2 average pooling: every output sample sits half-way
    between two input samples in each direction.
    """
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(h // 2, w // 2), mode="bilinear", align_corners=False)


def up(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 (align_corners=False). (B, C, H, W) -> (B, C, 2H, 2W)."""
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(2 * h, 2 * w), mode="bilinear", align_corners=False)


@DECOMPOSITIONS.register("laplacian")
class LaplacianPyramid(Decomposition):
    """The reference's Laplacian pyramid (bilinear down/up, no per-level normalisation); one stage
    is the identity. Level s has the input's channels at side ``H / 2^(S-1-s)``."""

    def __init__(self, num_stages: int, scales: Optional[Sequence[float]] = None):
        super().__init__(num_stages, scales)

    def check_size(self, height: int, width: int | None = None) -> None:
        """Raise a ValueError unless both sides halve exactly ``S - 1`` times."""
        factor = 2 ** (self.num_stages - 1)
        for name, side in (("height", height), ("width", width if width is not None else height)):
            if side % factor != 0:
                raise ValueError(
                    f"a {self.num_stages}-stage pyramid needs the {name} divisible by "
                    f"2^(stages-1) = {factor}, got {side}; use fewer stages or another size")

    def level_shapes(self, shape: Shape) -> List[Shape]:
        C, H, W = shape
        self.check_size(H, W)
        return [(C, H >> (self.num_stages - 1 - s), W >> (self.num_stages - 1 - s)) for s in range(self.num_stages)]

    def split(self, x: torch.Tensor) -> List[torch.Tensor]:
        levels: List[torch.Tensor] = [None] * self.num_stages  # type: ignore[list-item]
        cur = x
        for s in range(self.num_stages - 1, 0, -1):
            low = down(cur)
            levels[s] = cur - up(low)
            cur = low
        levels[0] = cur
        return levels

    def merge(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        cur = levels[0]
        for s in range(1, len(levels)):
            cur = up(cur) + levels[s]
        return cur

    def merge_first(self, levels: Sequence[torch.Tensor], n: int) -> torch.Tensor:
        """The first ``n`` levels recomposed at the resolution of level ``n - 1`` (no upsampling beyond)."""
        return self.merge(levels[:n])


def decomposition_of(model, num_stages: int) -> Decomposition:
    """The decomposition ``model`` owns (through DDP / compile wrappers), or the Laplacian pyramid of
    ``num_stages`` for a stand-in without one (a velocity field in a test); ValueError when its
    stage count is not ``num_stages``."""
    decomposition = getattr(inner_module(model), "decomposition", None) or LaplacianPyramid(num_stages)
    if decomposition.num_stages != num_stages:
        raise ValueError(f"{num_stages} stage(s) asked for, but the model's decomposition has "
                         f"{decomposition.num_stages}")
    return decomposition

"""Prediction targets: what the network outputs, and the space its loss is computed in, by name.

SiT's transport lets a model predict the velocity ``v = alpha' x + sigma' eps``, the noise
``eps`` or the score ``-eps / sigma`` of ``x_t = alpha x + sigma eps``; recent pixel-space work
predicts the clean data ``x``. A target knows

- its training target and the space its loss is computed in (``loss``: ``target``, its own
  space, the default; or ``velocity``: the prediction is converted to a velocity first, as
  x-prediction with a velocity loss does);
- how to turn a prediction into the velocity the integrators use (:meth:`to_velocity`), for any
  registered path (``dfm.paths``). The conversions divide by ``alpha`` (noise, score) or
  ``sigma`` (data), which vanish at t = 1 and t = 0 on the linear and cosine paths: they are
  evaluated at t clamped to ``[time_eps, 1 - time_eps]`` (SiT samples such models on that
  interval, ``sample_eps`` 1e-3). Guidance is applied to the velocities; every conversion is
  affine in the prediction with the same ``x_t``, so guiding predictions would give the same.

The model owns its target (``model.prediction``, the ``prediction`` option of its ``arch``).
A new target is one class here::

    @PREDICTIONS.register("my_target")
    class MyTarget(PredictionTarget):
        def target(self, x, eps, v, coefficients): ...     # what the network should output
        def to_velocity(self, out, x_t, coefficients): ... # its velocity at (x_t, t)
"""
from __future__ import annotations

import torch

from utils.modules import inner_module
from utils.registry import Registry

PREDICTIONS = Registry("prediction target", default="velocity", aliases={"v": "velocity", "eps": "noise",
                                                                          "x": "data"})
LOSS_SPACES = ("target", "velocity")


class PredictionTarget:
    """Base class. ``loss``: ``target`` (the target's own space) or ``velocity``; ``time_eps``:
    conversions to a velocity use times clamped to ``[time_eps, 1 - time_eps]``."""

    def __init__(self, loss: str = "target", time_eps: float = 1e-3):
        if loss not in LOSS_SPACES:
            raise ValueError(f"prediction target {self._name()!r}: loss must be one of "
                             f"{list(LOSS_SPACES)}, got {loss!r}")
        if not 0 <= time_eps < 0.5:
            raise ValueError(f"prediction target {self._name()!r}: time_eps must be in [0, 0.5), "
                             f"got {time_eps}")
        self.loss, self.time_eps = loss, float(time_eps)

    def _name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)

    # ------------------------------------------------------------------ to implement
    def target(self, x: torch.Tensor, eps: torch.Tensor, v: torch.Tensor, coefficients) -> torch.Tensor:
        """The training target of data ``x``, noise ``eps`` and velocity ``v`` (all (B, ...));
        ``coefficients``: the path's ``(alpha, sigma, d_alpha, d_sigma)`` broadcastable to them."""
        raise NotImplementedError

    def to_velocity(self, out: torch.Tensor, x_t: torch.Tensor, coefficients) -> torch.Tensor:
        """The velocity of a network output ``out`` at state ``x_t`` (the coefficients at the clamped time)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ provided
    def coefficients(self, path, t: torch.Tensor, like: torch.Tensor, clamp: bool = True):
        """The path's coefficients at ``t`` ((B,) per sample, or a 0-d time) shaped to broadcast
        against ``like`` (B, C, H, W); clamped to ``[time_eps, 1 - time_eps]`` when ``clamp``."""
        if clamp and self.time_eps > 0:
            t = t.clamp(self.time_eps, 1 - self.time_eps)
        if t.dim() == 1:
            t = t.view((-1,) + (1,) * (like.dim() - 1))
        return path.coefficients(t)

    def velocity(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, path) -> torch.Tensor:
        """The velocity the integrators use, of output ``out`` at ``(x_t, t)`` on ``path``."""
        return self.to_velocity(out, x_t, self.coefficients(path, t, x_t))

    def loss_pair(self, out: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor,
                  v: torch.Tensor, t: torch.Tensor, path):
        """``(prediction, target)`` in the loss space; the loss is their mean squared difference."""
        if self.loss == "velocity":
            return self.velocity(out, x_t, t.to(x_t.dtype), path), v
        return out, self.target(x, eps, v, self.coefficients(path, t.to(x.dtype), x, clamp=False))


@PREDICTIONS.register("velocity")
class Velocity(PredictionTarget):
    """The velocity ``alpha' x + sigma' eps`` (SiT, REPA, DFM: ``prediction: v``); loss in velocity space."""

    def __init__(self):
        super().__init__("target", 0.0)

    def target(self, x, eps, v, coefficients):
        return v

    def to_velocity(self, out, x_t, coefficients):
        return out

    # no coefficients computed at all: training and sampling stay what they were before targets existed
    def loss_pair(self, out, x, eps, x_t, v, t, path):
        return out, v

    def velocity(self, out, x_t, t, path):
        return out


def _velocity_from_noise(eps_hat, x_t, coefficients):
    alpha, sigma, d_alpha, d_sigma = coefficients
    return d_alpha * (x_t - sigma * eps_hat) / alpha + d_sigma * eps_hat


@PREDICTIONS.register("noise")
class Noise(PredictionTarget):
    """The noise ``eps`` (DDPM's epsilon-prediction); loss ``|eps_hat - eps|^2`` (SiT's, weight none)."""

    def target(self, x, eps, v, coefficients):
        return eps

    def to_velocity(self, out, x_t, coefficients):
        return _velocity_from_noise(out, x_t, coefficients)


@PREDICTIONS.register("score")
class Score(PredictionTarget):
    """The score ``-eps / sigma`` of the marginal; loss in noise space ``|sigma s_hat + eps|^2`` (SiT's,
    weight none), i.e. the target ``-eps / sigma`` compared after multiplying both by sigma."""

    def target(self, x, eps, v, coefficients):
        return -eps / coefficients[1]

    def loss_pair(self, out, x, eps, x_t, v, t, path):
        if self.loss == "velocity":
            return super().loss_pair(out, x, eps, x_t, v, t, path)
        sigma = self.coefficients(path, t.to(x.dtype), x, clamp=False)[1]
        return sigma * out, -eps

    def to_velocity(self, out, x_t, coefficients):
        return _velocity_from_noise(-coefficients[1] * out, x_t, coefficients)


@PREDICTIONS.register("data")
class Data(PredictionTarget):
    """The clean data ``x`` (x-prediction, as recent pixel-space models use); loss ``|x_hat - x|^2``,
    or with ``loss: velocity`` the velocity loss of x-prediction."""

    def target(self, x, eps, v, coefficients):
        return x

    def to_velocity(self, out, x_t, coefficients):
        alpha, sigma, d_alpha, d_sigma = coefficients
        return d_alpha * out + d_sigma * (x_t - alpha * out) / sigma


def prediction_of(model) -> PredictionTarget:
    """The prediction target ``model`` owns (through wrappers), or velocity for a stand-in without one."""
    return getattr(inner_module(model), "prediction", None) or PREDICTIONS.build(None)

r"""The maths of post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models", 2024, section 3), in float64 numpy.

A power-function EMA with exponent gamma averages the weights theta(tau) seen up to time t with the
kernel ``p(tau; t) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on [0, t]; its relative std is
``sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))`` (so gamma is the largest real root of
``g^3 + 7 g^2 + (16 - sigma^-2) g + (12 - sigma^-2)``). In steps it is the update
``ema <- beta_t ema + (1 - beta_t) theta`` with ``beta_t = (1 - 1/t)^(gamma + 1)`` at update t.

Snapshots (t_i, gamma_i) span kernels p_i; a target (t_r, gamma_r) is matched in L2 over tau:
``A x = b`` with ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_r>``, and
``<p_a, p_b> = (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1))``,
``m = min(t_a, t_b)`` (computed in logarithms). The relative L2 error of the reconstructed kernel,
``|sum x_i p_i - p_r| / |p_r|``, says how well the snapshots reach a std.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# gamma = 0 gives 0.2887; beyond MAX_STD the kernel is no power function. Below MIN_STD gamma passes
# 1e6: the profile is the raw weights of the last step to float precision, and sigma^-2 overflows
# long before the smallest float.
MIN_STD = 0.001
MAX_STD = 0.28
MAX_KERNEL_ERROR = 0.05  # relative L2 error of a reconstructed averaging kernel


def std_problem(std) -> str | None:
    """Why `std` is no relative std of a power-function EMA (None when it is one)."""
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std):
        return f"{std!r} is not a number"
    if not MIN_STD <= std <= MAX_STD:
        return f"{std!r} is outside [{MIN_STD}, {MAX_STD}]"
    return None


def std_to_exponent(std: float) -> float:
    """gamma of a power-function EMA with relative std ``std`` (MIN_STD <= std <= MAX_STD)."""
    inv = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def exponent_to_std(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def kernel_dot(t_a, g_a, t_b, g_b) -> np.ndarray:
    """<p_a, p_b> of power kernels (arrays broadcast), in float64 through logarithms."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    m = np.minimum(t_a, t_b)
    log = (np.log(g_a + 1) + np.log(g_b + 1) + (g_a + g_b + 1) * np.log(m) - np.log(g_a + g_b + 1)
           - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return np.exp(log)


def solve_coefficients(times: Sequence[float], gammas: Sequence[float], t_target: float, g_target: float):
    """(x (n,), relative kernel error) of the least-squares reconstruction of (t_target, g_target) from
    the n kernels (times[i], gammas[i]). ValueError when the system has no finite solution."""
    t, g = np.asarray(times, np.float64), np.asarray(gammas, np.float64)
    A = kernel_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = kernel_dot(t, g, t_target, g_target)
    try:
        x = np.linalg.lstsq(A, b, rcond=None)[0]
    except np.linalg.LinAlgError as e:
        raise ValueError(f"the least-squares system has no solution ({e})") from None
    if not np.all(np.isfinite(x)):
        raise ValueError("the least-squares system has no finite solution")
    target = float(kernel_dot(t_target, g_target, t_target, g_target))
    residual = max(target - 2 * float(x @ b) + float(x @ A @ x), 0.0)
    return x, math.sqrt(residual / target)


def reachable_stds(times: Sequence[float], gammas: Sequence[float], t_target: float) -> tuple:
    """(lowest, highest) std that the kernels reconstruct within MAX_KERNEL_ERROR at t_target, on a
    geometric grid of 120 stds; (None, None) when none."""
    ok = [std for std in np.geomspace(0.005, MAX_STD, 120)
          if solve_coefficients(times, gammas, t_target, std_to_exponent(std))[1] <= MAX_KERNEL_ERROR]
    return (float(min(ok)), float(max(ok))) if ok else (None, None)

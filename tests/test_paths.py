"""The contract of every registered probability path and prediction target (dfm/paths.py,
dfm/predictions.py), checked for whatever this checkout registers: a new entry is tested here by
being registered, against finite differences and closed forms, never against itself."""
import math

import pytest
import torch

from dfm import PATHS, PREDICTIONS, Path

T = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95], dtype=torch.float64)


@pytest.mark.parametrize("name", PATHS.names())
def test_path_derivatives_are_the_time_derivatives_of_its_coefficients(name):
    path = PATHS.build(name)
    h = 1e-6
    plus, minus = path.coefficients(T + h), path.coefficients(T - h)
    alpha, sigma, d_alpha, d_sigma = path.coefficients(T)
    torch.testing.assert_close(d_alpha, (plus[0] - minus[0]) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(d_sigma, (plus[1] - minus[1]) / (2 * h), rtol=1e-6, atol=1e-7)
    assert (alpha > 0).all() and (sigma > 0).all()
    # the velocity of x_t is the time derivative of x_t along a fixed (x, eps)
    x, eps = torch.randn(5, 3, 2, 2, dtype=torch.float64), torch.randn(5, 3, 2, 2, dtype=torch.float64)
    _, v = path.interpolate(x, eps, T)
    ahead, behind = path.interpolate(x, eps, T + h)[0], path.interpolate(x, eps, T - h)[0]
    torch.testing.assert_close(v, (ahead - behind) / (2 * h), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PATHS.names())
def test_score_from_velocity_is_the_gaussian_score(name):
    """Data ~ N(m, s^2): the marginal at t is N(alpha m, alpha^2 s^2 + sigma^2), its score is known in
    closed form, and so is the exact velocity E[v | x_t] (a linear function of x_t)."""
    path = PATHS.build(name)
    m, s = 0.7, 0.4
    x_t = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    for t in T:
        alpha, sigma, d_alpha, d_sigma = path.coefficients(t)
        var = alpha ** 2 * s ** 2 + sigma ** 2
        score = -(x_t - alpha * m) / var
        # E[x | x_t] and E[eps | x_t] of the Gaussian, then v = alpha' E[x] + sigma' E[eps]
        ex = m + alpha * s ** 2 / var * (x_t - alpha * m)
        ee = sigma / var * (x_t - alpha * m)
        v = d_alpha * ex + d_sigma * ee
        torch.testing.assert_close(path.score_from_velocity(v, x_t, t), score, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", PATHS.names())
def test_time_at_noise_ratio_inverts_sigma_over_alpha(name):
    path = PATHS.build(name)
    if type(path).time_at_noise_ratio is Path.time_at_noise_ratio:
        pytest.skip(f"{name} defines no time_at_noise_ratio")
    alpha, sigma, _, _ = path.coefficients(T)
    torch.testing.assert_close(path.time_at_noise_ratio(sigma / alpha), T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path_name", PATHS.names())
@pytest.mark.parametrize("target_name", PREDICTIONS.names())
def test_every_target_converts_its_own_target_back_to_the_velocity(target_name, path_name):
    """At interior times (no clamping), the velocity of the exact target is the path's velocity, and
    the loss pair in velocity space is (that velocity, v)."""
    path, target = PATHS.build(path_name), PREDICTIONS.build(target_name)
    x, eps = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    x_t, v = path.interpolate(x, eps, T)
    exact = target.target(x, eps, v, target.coefficients(path, T, x, clamp=False))
    torch.testing.assert_close(target.velocity(exact, x_t, T, path), v, rtol=1e-9, atol=1e-9)
    # one sample at a time with a 0-d time, as the sampler calls it
    torch.testing.assert_close(target.velocity(exact[2:3], x_t[2:3], T[2], path), v[2:3], rtol=1e-9, atol=1e-9)
    out = exact + 0.1 * torch.randn_like(exact)  # an imperfect prediction: the pair still has the target's shape
    p, q = target.loss_pair(out, x, eps, x_t, v, T, path)
    assert p.shape == q.shape == x.shape


def test_velocity_is_the_identity_and_the_default():
    target = PREDICTIONS.build(None)
    assert PREDICTIONS.split("v") == ("velocity", {}) and type(target).registered_name == "velocity"
    out = torch.randn(2, 3, 4, 4)
    x_t = torch.randn(2, 3, 4, 4)
    assert target.velocity(out, x_t, torch.tensor(1.0), PATHS.build(None)) is out


def test_bad_specs_are_one_line():
    with pytest.raises(ValueError, match="unknown probability path 'linaer' \\(did you mean 'linear'\\?\\)"):
        PATHS.build("linaer")
    with pytest.raises(ValueError, match="unknown prediction target 'epsilon'"):
        PREDICTIONS.build("epsilon")


def test_linear_path_and_lognormal_keep_the_reference_formulas():
    """SPEC §1: x_t = (1 - t) x + t eps, v = eps - x; lognormal t = sigma / (1 + sigma)."""
    from dfm import sample_timesteps

    x, eps, t = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.rand(4)
    x_t, v = PATHS.build("linear").interpolate(x, eps, t)
    tt = t.view(-1, 1, 1, 1)
    assert torch.equal(x_t, (1 - tt) * x + tt * eps) and torch.equal(v, -1 * x + 1 * eps)
    g = torch.Generator().manual_seed(0)
    ratio = torch.randn(1000, generator=torch.Generator().manual_seed(0)).exp()
    assert torch.equal(sample_timesteps(1000, "lognormal", generator=g), ratio / (1 + ratio))
    t_cos = sample_timesteps(1000, "lognormal", "cosine", generator=torch.Generator().manual_seed(0))
    assert torch.equal(t_cos, 2 / math.pi * torch.atan(ratio))

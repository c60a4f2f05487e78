"""The VP path (SiT's VP, a linear beta schedule): its coefficients against SiT's definition, its
SDE against the Gaussian it must sample, and a model trained, resumed and sampled on it."""
import math

import pytest
import torch
from scipy import integrate

from dfm import PATHS
from samplers import sample

from train_helpers import check_whole_pipeline


def test_vp_coefficients_are_sits_in_our_time():
    """SiT (t = 0 noise, t = 1 data): log alpha(s) = -(1 - s)^2 (b1 - b0) / 4 - (1 - s) b0 / 2; ours is
    the same at s = 1 - t; and alpha(t) = exp(-1/2 int_0^t beta), beta the linear schedule."""
    vp = PATHS.build({"name": "vp", "beta_min": 0.1, "beta_max": 20.0})
    for t in (0.0, 0.1, 0.37, 0.8, 1.0):
        s = 1 - t
        sit = math.exp(-0.25 * (1 - s) ** 2 * (20.0 - 0.1) - 0.5 * (1 - s) * 0.1)
        integral = integrate.quad(lambda u: 0.1 + u * (20.0 - 0.1), 0, t)[0]
        alpha, sigma, _, _ = vp.coefficients(torch.tensor(t, dtype=torch.float64))
        assert float(alpha) == pytest.approx(sit, rel=1e-12) == pytest.approx(math.exp(-0.5 * integral), rel=1e-9)
        assert float(alpha ** 2 + sigma ** 2) == pytest.approx(1.0, abs=1e-12)  # variance preserving
    assert float(vp.coefficients(torch.tensor(1.0))[0]) == pytest.approx(math.exp(-5.025), rel=1e-6)


def test_vp_diffusion_is_the_variance_preserving_sde():
    """w(t) = beta(t) = 2 sigma^2 d/dt log(sigma / alpha): the diffusion whose reverse SDE has the path's
    marginals (DDPM's), checked against finite differences of the coefficients."""
    vp = PATHS.build("vp")
    t = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)
    h = 1e-6

    def log_ratio(u):
        alpha, sigma, _, _ = vp.coefficients(u)
        return torch.log(sigma / alpha)

    sigma = vp.coefficients(t)[1]
    expected = 2 * sigma ** 2 * (log_ratio(t + h) - log_ratio(t - h)) / (2 * h)
    torch.testing.assert_close(vp.diffusion(t), expected, rtol=1e-6, atol=1e-8)


class GaussianVelocityOn(torch.nn.Module):
    """The exact velocity E[v | x_t] of data ~ N(m, s^2) on `path` (a one-stage stand-in model)."""

    num_stages, num_classes = 1, 1

    def __init__(self, path, m: float, s: float):
        super().__init__()
        self.path, self.m, self.s = path, m, s
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, xs, t, y, active=None):
        x_t, t = xs[0], t[:, 0].view(-1, 1, 1, 1).to(torch.float64)
        alpha, sigma, d_alpha, d_sigma = self.path.coefficients(t)
        var = alpha ** 2 * self.s ** 2 + sigma ** 2
        ex = self.m + alpha * self.s ** 2 / var * (x_t - alpha * self.m)
        ee = sigma / var * (x_t - alpha * self.m)
        return [d_alpha * ex + d_sigma * ee]


def test_vp_ode_and_sde_sample_the_gaussian():
    """From N(0, I) at t = 1 (alpha(1) = 0.0066, so the start is off by that much) both samplers reach
    N(m, s^2): the ODE sample by sample (a known affine map), the SDE in distribution."""
    m, s = 1.5, 0.5
    model = GaussianVelocityOn(PATHS.build("vp"), m, s)
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(4000, 1, 2, 2, generator=g, dtype=torch.float64)]
    y = torch.zeros(4000, dtype=torch.long)
    ode = sample(model, noise, y, num_steps_per_scale=[400], method="heun")[0].double()
    # the exact flow from t = 1 keeps z = (x - alpha m) / sqrt(alpha^2 s^2 + sigma^2), ending at m + s z
    alpha, sigma, _, _ = model.path.coefficients(torch.tensor(1.0, dtype=torch.float64))
    exact = m + s * (noise[0] - alpha * m) / torch.sqrt(alpha ** 2 * s ** 2 + sigma ** 2)
    assert (ode - exact).abs().max().item() < 2e-3
    sde = sample(model, noise, y, num_steps_per_scale=[400], method={"name": "sde", "last_noisy_time": 0.002},
                 generator=torch.Generator().manual_seed(1))[0].double()
    assert sde.mean().item() == pytest.approx(m, abs=0.02) and sde.std().item() == pytest.approx(s, abs=0.02)


def test_a_model_on_the_vp_path_trains_resumes_and_samples(tiny_data, tmp_path):
    result = check_whole_pipeline(tiny_data, tmp_path, {"path_type": "vp", "time_distribution": "uniform"},
                                  methods=("euler", "sde"))
    assert result["ckpt"]["arch"]["path_type"] == "vp" and result["ckpt"]["config"]["path_type"] == "vp"

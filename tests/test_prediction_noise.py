"""Noise prediction (DDPM's epsilon): its loss, its conversion to the velocity against hand-derived
formulas, sampling with it, and a model trained, resumed and sampled with it."""
import pytest
import torch

from conftest import one_stage_loss_and_draw, tiny_model
from dfm import PATHS, PREDICTIONS
from samplers import sample

from train_helpers import check_whole_pipeline


def test_noise_velocity_on_the_linear_path_is_the_hand_formula():
    """x_t = (1 - t) x + t eps, v = eps - x: with x = (x_t - t eps) / (1 - t), v = (eps - x_t) / (1 - t)."""
    target = PREDICTIONS.build("noise")
    eps_hat, x_t = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    for t in (0.1, 0.5, 0.9):
        v = target.velocity(eps_hat, x_t, torch.tensor(t, dtype=torch.float64), PATHS.build("linear"))
        torch.testing.assert_close(v, (eps_hat - x_t) / (1 - t), rtol=1e-12, atol=1e-12)


def test_noise_velocity_at_pure_noise_is_taken_at_the_clamped_time():
    """alpha(1) = 0 on the linear path: the conversion is evaluated at 1 - time_eps (SiT's sample_eps)."""
    target = PREDICTIONS.build({"name": "noise", "time_eps": 1e-3})
    eps_hat, x_t = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64)
    v = target.velocity(eps_hat, x_t, torch.tensor(1.0, dtype=torch.float64), PATHS.build("linear"))
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, (eps_hat - x_t) / 1e-3, rtol=1e-9, atol=1e-9)


def test_the_loss_of_a_noise_model_is_the_noise_error():
    assert type(tiny_model("SiT-S/2", prediction="noise").prediction).registered_name == "noise"
    loss, x, eps, t, x_t, eps_hat = one_stage_loss_and_draw("noise")
    assert loss == pytest.approx(((eps_hat - eps) ** 2).mean().item(), rel=1e-5)


class GaussianNoisePredictor(torch.nn.Module):
    """The exact E[eps | x_t] of data ~ N(m, s^2) on the linear path, as a noise-predicting model."""

    num_stages, num_classes = 1, 1

    def __init__(self, m: float, s: float):
        super().__init__()
        self.m, self.s = m, s
        self.prediction = PREDICTIONS.build("noise")
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, xs, t, y, active=None):
        t = t[:, 0].view(-1, 1, 1, 1).to(torch.float64)
        var = (1 - t) ** 2 * self.s ** 2 + t ** 2
        return [t / var * (xs[0] - (1 - t) * self.m)]


def test_sampling_a_noise_model_reaches_the_data():
    """Euler from t = 1 with the exact noise predictor converges to m + s z (first order)."""
    m, s = 1.5, 0.5
    model = GaussianNoisePredictor(m, s)
    noise = [torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)]
    y = torch.zeros(64, dtype=torch.long)
    exact = m + s * noise[0]
    errors = [(sample(model, noise, y, num_steps_per_scale=[n])[0].double() - exact).abs().max().item()
              for n in (50, 100, 200)]
    assert errors[-1] < 0.02 and errors[0] / errors[2] > 3, errors


def test_a_noise_model_trains_resumes_and_samples(tiny_data, tmp_path):
    result = check_whole_pipeline(tiny_data, tmp_path, {"prediction": "noise"}, methods=("euler", "sde"))
    assert result["ckpt"]["arch"]["prediction"] == "noise"

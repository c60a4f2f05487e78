"""Score and clean-data (x) prediction: losses as SiT and x-prediction work define them, conversions
against hand formulas on the linear path, and an x-prediction model with a velocity loss end to end."""
import pytest
import torch

from conftest import one_stage_loss_and_draw
from dfm import PATHS, PREDICTIONS

from train_helpers import check_whole_pipeline


def test_score_loss_is_sits_noise_space_loss():
    """SiT (weight none): |sigma s_hat + eps|^2, sigma = t on the linear path."""
    loss, x, eps, t, x_t, out = one_stage_loss_and_draw("score")
    assert loss == pytest.approx(((t * out + eps) ** 2).mean().item(), rel=1e-5)


def test_data_losses_in_data_and_velocity_space():
    loss, x, eps, t, x_t, out = one_stage_loss_and_draw("data")
    assert loss == pytest.approx(((out - x) ** 2).mean().item(), rel=1e-5)
    loss, x, eps, t, x_t, out = one_stage_loss_and_draw({"name": "data", "loss": "velocity"})
    v_hat = (x_t - out) / t  # x-prediction's velocity on the linear path (t is never clamped here)
    assert loss == pytest.approx(((v_hat - (eps - x)) ** 2).mean().item(), rel=1e-4)


def test_conversions_on_the_linear_path_are_the_hand_formulas():
    """data: v = (x_t - x_hat) / t; score: eps = -t s, so v = (eps - x_t) / (1 - t) with that eps."""
    x_t, out = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    linear = PATHS.build("linear")
    for t in (0.2, 0.7):
        tt = torch.tensor(t, dtype=torch.float64)
        torch.testing.assert_close(PREDICTIONS.build("x").velocity(out, x_t, tt, linear), (x_t - out) / t)
        torch.testing.assert_close(PREDICTIONS.build("score").velocity(out, x_t, tt, linear),
                                   (-t * out - x_t) / (1 - t))


def test_bad_loss_space_is_one_line():
    with pytest.raises(ValueError, match="prediction target 'data': loss must be one of \\['target', 'velocity'\\]"):
        PREDICTIONS.build({"name": "data", "loss": "pixels"})


def test_x_prediction_with_a_velocity_loss_trains_resumes_and_samples(tiny_data, tmp_path):
    result = check_whole_pipeline(tiny_data, tmp_path, {"prediction": "{name: data, loss: velocity}"},
                                  methods=("heun",), eval_swd=False)
    assert result["ckpt"]["arch"]["prediction"] == {"name": "data", "loss": "velocity"}

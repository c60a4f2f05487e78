import math

import pytest
import torch
from scipy import stats

from conftest import randomize_, tiny_model
from dfm import (PATHS, FlowMatchingObjective, LaplacianPyramid, projection_loss, sample_logit_normal,
                 sample_stages, sample_timesteps)


class Recorder(torch.nn.Module):
    """Stands in for a model: records its inputs and returns ``predict(xs, t)``."""

    def __init__(self, num_stages, predict):
        super().__init__()
        self.num_stages = num_stages
        self.predict = predict

    def forward(self, xs, t, y, active, return_features=False):
        self.xs, self.t, self.active = xs, t, active
        return self.predict(xs, t)


def test_oracle_model_has_zero_loss_so_targets_are_eps_minus_P():
    x = torch.randn(6, 4, 16, 16, dtype=torch.float64)
    levels = LaplacianPyramid(2).decompose(x)

    def oracle(xs, t):  # x_t = (1 - t) P + t eps  =>  eps - P = (x_t - P) / t
        return [(xt - P) / t[:, s].view(-1, 1, 1, 1) for s, (xt, P) in enumerate(zip(xs, levels))]

    objective = FlowMatchingObjective(2, stage_weights=[0.5, 0.5], stage_sampling="per_sample")
    out = objective(Recorder(2, oracle), x, torch.zeros(6, dtype=torch.long),
                    generator=torch.Generator().manual_seed(0))
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-20)


def test_loss_by_hand_with_masks():
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    levels = LaplacianPyramid(2).decompose(x)
    pred = [torch.randn_like(P) for P in levels]
    model = Recorder(2, lambda xs, t: pred)
    objective = FlowMatchingObjective(2, stage_weights=[0.5, 0.5], stage_sampling="per_sample")
    out = objective(model, x, torch.zeros(8, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    t, active = model.t, model.active
    assert torch.equal(active[:, 0], torch.ones(8, dtype=torch.bool))
    per_sample = torch.zeros(8, dtype=torch.float64)
    for s in range(2):
        ts = t[:, s].view(-1, 1, 1, 1).double()
        eps = (model.xs[s] - (1 - ts) * levels[s]) / ts
        mse = ((pred[s] - (eps - levels[s])) ** 2).mean(dim=(1, 2, 3))
        per_sample += mse * active[:, s]
    assert out["loss"].item() == pytest.approx(per_sample.mean().item(), rel=1e-9)
    # inactive stages: t = 1 and their prediction does not enter the loss
    inactive = ~active[:, 1]
    assert inactive.any() and torch.all(t[inactive, 1] == 1)


def test_stage_one_never_trained_with_weights_one_zero():
    x = torch.randn(4, 3, 8, 8)
    model = Recorder(2, lambda xs, t: [torch.zeros_like(xs[0]), torch.full_like(xs[1], 1e6)])
    objective = FlowMatchingObjective(2, stage_weights=[1.0, 0.0])
    out = objective(model, x, torch.zeros(4, dtype=torch.long))
    assert out["loss"].item() < 100 and out["stage_losses"][1].item() == 0
    assert not model.active[:, 1].any()


def test_one_stage_objective_is_plain_sit_loss():
    from conftest import one_stage_loss_and_draw

    loss, x, eps, t, x_t, v = one_stage_loss_and_draw()
    assert loss == pytest.approx(((v - (eps - x)) ** 2).mean().item(), rel=1e-5)


def test_cosine_path_velocity_is_time_derivative():
    x, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    h = 1e-6
    cosine = PATHS.build("cosine")
    x_plus, _ = cosine.interpolate(x, eps, t + h)
    x_minus, _ = cosine.interpolate(x, eps, t - h)
    _, v = cosine.interpolate(x, eps, t)
    torch.testing.assert_close(v, (x_plus - x_minus) / (2 * h), rtol=1e-6, atol=1e-8)
    alpha, sigma, _, _ = cosine.coefficients(t)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(t))


def test_stage_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.9, 0.1])
    k = sample_stages(20000, weights, "per_sample", g)
    frac = k.float().mean().item()
    assert abs(frac - 0.1) < 4 * math.sqrt(0.09 / 20000)
    draws = torch.stack([sample_stages(16, weights, "per_batch", g) for _ in range(4000)])
    assert torch.all(draws == draws[:, :1])
    frac = draws[:, 0].float().mean().item()
    assert abs(frac - 0.1) < 4 * math.sqrt(0.09 / 4000)


def test_timestep_distributions():
    g = torch.Generator().manual_seed(0)
    u = sample_timesteps(20000, "uniform", generator=g).numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    t = sample_timesteps(20000, "lognormal", generator=g).double()
    assert stats.kstest(torch.logit(t).numpy(), "norm").pvalue > 1e-3
    t = sample_timesteps(20000, "lognormal", "cosine", generator=g).double()
    sigma = torch.tan(t * math.pi / 2)
    assert stats.kstest(torch.log(sigma).numpy(), "norm").pvalue > 1e-3
    early = sample_logit_normal((20000,), -2.0, 1.0, generator=g).double()
    assert stats.kstest(torch.logit(early).numpy(), "norm", args=(-2.0, 1.0)).pvalue > 1e-3
    assert early.median().item() == pytest.approx(1 / (1 + math.e ** 2), abs=0.005)  # ~0.119


def test_earlier_stages_get_low_noise_times():
    objective = FlowMatchingObjective(3, stage_weights=[0.0, 0.0, 1.0])
    t, active = objective.sample_times(20000, generator=torch.Generator().manual_seed(0))
    assert active.all()
    for s in (0, 1):
        assert stats.kstest(torch.logit(t[:, s].double()).numpy(), "norm", args=(-2.0, 1.0)).pvalue > 1e-3
    assert stats.kstest(t[:, 2].numpy(), "uniform").pvalue > 1e-3


def test_projection_loss_by_hand():
    z = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, -1.0]]])
    expected = -(1 / math.sqrt(2) + -1.0) / 2
    assert projection_loss([z], [target]).item() == pytest.approx(expected)


def test_objective_with_repa_features():
    model = randomize_(tiny_model("DFM-SiT-S/2", z_dims=[6], encoder_depth=1))
    feats = [torch.randn(2, 16, 6)]
    out = FlowMatchingObjective(2, proj_coeff=0.5)(model, torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), feats)
    assert out["proj_loss"].item() != 0
    assert out["loss"].item() == pytest.approx(out["denoising_loss"].item() + 0.5 * out["proj_loss"].item(), rel=1e-5)
    out["loss"].backward()
    assert model.projectors[0][0].weight.grad.abs().sum() > 0


def test_bad_objective_arguments():
    with pytest.raises(ValueError, match="stage_weights must sum to 1"):
        FlowMatchingObjective(2, stage_weights=[0.5, 0.4])
    with pytest.raises(ValueError, match="one entry per stage"):
        FlowMatchingObjective(2, stage_weights=[1.0])
    with pytest.raises(ValueError, match="stage_sampling"):
        FlowMatchingObjective(2, stage_sampling="per_gpu")
    with pytest.raises(ValueError, match="unknown time distribution 'cosmap'.*registered in this checkout: uniform"):
        FlowMatchingObjective(1, time_distribution="cosmap")

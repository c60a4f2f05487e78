import pytest
import torch

import samplers
from samplers import multistage_schedule, sde_schedule


class GaussianVelocity(torch.nn.Module):
    """Exact velocity of the linear path for data ~ N(mu_s[y], s_s^2 I) in every stage s.

    With ``m = (1 - t) mu`` and ``var = (1 - t)^2 s^2 + t^2``:
    ``v(x, t) = (t - (1 - t) s^2) / var * (x - m) - mu``; the ODE maps noise ``z`` at t = 1 to
    ``mu + s z`` at t = 0. The null label (``num_classes``) has mean 0.
    """

    def __init__(self, means, stds, num_classes=3):
        super().__init__()
        self.num_stages = len(stds)
        self.num_classes = num_classes
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float64))  # (classes, S)
        self.stds = stds
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.calls = 0

    def mean(self, y, s):
        table = torch.cat([self.means, torch.zeros(1, self.num_stages, dtype=torch.float64)])
        return table[y, s].view(-1, 1, 1, 1)

    def forward(self, xs, t, y, active=None):
        self.calls += 1
        out = []
        for s, x in enumerate(xs):
            ts = t[:, s].view(-1, 1, 1, 1)
            mu, sd = self.mean(y, s), self.stds[s]
            var = (1 - ts) ** 2 * sd ** 2 + ts ** 2
            out.append((ts - (1 - ts) * sd ** 2) / var * (x - (1 - ts) * mu) - mu)
        return out


def endpoint_error(model, noise, y, **kw):
    out = samplers.sample(model, noise, y, **kw)
    exact = [model.mean(y, s) + model.stds[s] * z for s, z in enumerate(noise)]
    return max((o.double() - e).abs().max().item() for o, e in zip(out, exact))


def test_reference_two_stage_schedule_table():
    times, active = multistage_schedule([40, 10], [0.1])
    assert times.shape == (51, 2) and active.shape == (50, 2)
    k = torch.arange(41, dtype=torch.float64)
    torch.testing.assert_close(times[:41, 0], 1 - 0.0225 * k, rtol=0, atol=1e-12)
    assert torch.all(times[:41, 1] == 1)
    j = torch.arange(11, dtype=torch.float64)
    torch.testing.assert_close(times[40:, 0], 0.1 - 0.01 * j, rtol=0, atol=1e-12)
    torch.testing.assert_close(times[40:, 1], 1 - 0.1 * j, rtol=0, atol=1e-12)
    assert active[:40, 0].all() and not active[:40, 1].any() and active[40:].all()


@pytest.mark.parametrize("steps,taus", [([10, 5, 5], [0.3, 0.05]), ([7, 3, 4, 6], [0.5, 0.25, 0.1]),
                                        ([1, 1, 1], [0.9, 0.8])])
def test_multistage_schedules_are_monotone(steps, taus):
    times, active = multistage_schedule(steps, taus)
    N = sum(steps)
    assert times.shape == (N + 1, len(steps)) and active.shape == (N, len(steps))
    assert torch.all(times[1:] <= times[:-1])
    assert torch.all(times[0] == 1) and torch.all(times[-1] == 0)
    starts = [sum(steps[:i]) for i in range(len(steps))]
    for i, start in enumerate(starts):
        assert not active[:start, i].any() and active[start:, i].all()
        assert torch.all(times[:start + 1, i] == 1)
        if i < len(taus):
            assert times[start + steps[i], i].item() == pytest.approx(taus[i])


def test_one_stage_schedules_match_repa():
    times, active = multistage_schedule([25])
    assert torch.equal(times[:, 0], torch.linspace(1, 0, 26, dtype=torch.float64))
    times, _ = sde_schedule([25])
    expected = torch.cat([torch.linspace(1, 0.04, 25, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    assert torch.equal(times[:, 0], expected)


def test_bad_schedules():
    with pytest.raises(ValueError, match="thresholds must have"):
        multistage_schedule([40, 10], [])
    with pytest.raises(ValueError, match="strictly decreasing"):
        multistage_schedule([10, 10, 10], [0.1, 0.2])
    with pytest.raises(ValueError, match="positive integers"):
        multistage_schedule([10, 0], [0.1])
    with pytest.raises(ValueError, match="at most 100,000 steps"):  # a typo's 10**20 was a torch traceback
        multistage_schedule([10 ** 20, 10], [0.1])
    with pytest.raises(ValueError, match="at most 100,000 steps"):
        multistage_schedule([99_999, 2], [0.1])
    assert multistage_schedule([99_999, 1], [0.1])[0].shape == (100_001, 2)


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_ode_samplers_converge_with_their_order(method, order):
    model = GaussianVelocity([[1.5]], [0.5], num_classes=1)
    noise = [torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))]
    y = torch.zeros(64, dtype=torch.long)
    errors = [endpoint_error(model, noise, y, num_steps_per_scale=[n], method=method) for n in (10, 20, 40)]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert errors[-1] < (0.1 if order == 1 else 0.005)
    for r in ratios:
        assert 2 ** order * 0.8 < r < 2 ** order * 1.25, (errors, ratios)


def test_heun_nfe_is_2n_minus_1():
    model = GaussianVelocity([[1.0]], [1.0], num_classes=1)
    samplers.sample(model, [torch.randn(2, 1, 1, 1)], torch.zeros(2, dtype=torch.long),
                    num_steps_per_scale=[10], method="heun")
    assert model.calls == 19


def test_multistage_euler_converges_to_every_stage_endpoint():
    model = GaussianVelocity([[1.0, -0.5]], [0.3, 0.8], num_classes=1)
    g = torch.Generator().manual_seed(1)
    noise = [torch.randn(16, 2, 2, 2, generator=g), torch.randn(16, 2, 4, 4, generator=g)]
    y = torch.zeros(16, dtype=torch.long)
    errors = [endpoint_error(model, noise, y, num_steps_per_scale=[40 * k, 10 * k], thresholds=[0.1])
              for k in (1, 2, 4)]
    assert errors[-1] < 0.1
    for a, b in zip(errors, errors[1:]):
        assert 1.6 < a / b < 2.5, errors
    calls_before = model.calls
    samplers.sample(model, noise, y, num_steps_per_scale=[40, 10], thresholds=[0.1])
    assert model.calls - calls_before == 50


def test_sde_matches_target_mean_and_variance():
    torch.manual_seed(0)
    model = GaussianVelocity([[1.5]], [0.5], num_classes=1)
    noise = [torch.randn(20000, 1, 1, 1)]
    out = samplers.sample(model, noise, torch.zeros(20000, dtype=torch.long), num_steps_per_scale=[100],
                          method="sde", generator=torch.Generator().manual_seed(1))[0]
    assert out.mean().item() == pytest.approx(1.5, abs=0.02)
    assert out.std().item() == pytest.approx(0.5, rel=0.05)


def test_sde_per_sample_generators_make_samples_batch_independent():
    model = GaussianVelocity([[0.0], [1.0], [2.0]], [0.7])
    noise = torch.randn(4, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 1])

    def run(idx):
        gens = [torch.Generator().manual_seed(100 + i) for i in idx]
        return samplers.sample(model, [noise[idx]], y[idx], num_steps_per_scale=[8], method="sde", generator=gens)[0]

    full = run([0, 1, 2, 3])
    torch.testing.assert_close(run([2, 3]), full[2:], rtol=0, atol=0)


def test_cfg_scale_one_equals_conditional_sampler():
    model = GaussianVelocity([[0.0], [1.0], [2.0]], [0.5])
    noise, y = [torch.randn(6, 1, 2, 2)], torch.tensor([0, 1, 2, 0, 1, 2])
    plain = samplers.sample(model, noise, y, num_steps_per_scale=[12])[0]
    model.calls = 0
    guided = samplers.sample(model, noise, y, num_steps_per_scale=[12], cfg_scale=1.0)[0]
    assert torch.equal(plain, guided) and model.calls == 12


def test_cfg_with_interval_matches_a_hand_loop():
    model = GaussianVelocity([[0.0], [1.0], [2.0]], [0.5])
    noise, y = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2])
    w, low, high, N = 3.0, 0.25, 0.65, 10
    out = samplers.sample(model, [noise], y, num_steps_per_scale=[N], cfg_scale=w,
                          guidance_low=low, guidance_high=high)[0]
    x = noise.clone()
    ts = torch.linspace(1, 0, N + 1, dtype=torch.float64)
    null = torch.full_like(y, 3)
    for a, b in zip(ts[:-1], ts[1:]):
        t = torch.full((3, 1), a.item(), dtype=torch.float64)
        v = model([x], t, y)[0]
        if low <= a <= high:
            v_u = model([x], t, null)[0]
            v = v_u + w * (v - v_u)
        x = x + (b - a) * v
    torch.testing.assert_close(out.double(), x, rtol=1e-6, atol=1e-6)


def test_previews_and_inactive_noise_kept():
    model = GaussianVelocity([[1.0, -0.5]], [0.3, 0.8], num_classes=1)
    noise = [torch.randn(2, 1, 2, 2), torch.randn(2, 1, 4, 4)]
    final, previews = samplers.sample(model, noise, torch.zeros(2, dtype=torch.long), num_steps_per_scale=[8, 4],
                                      thresholds=[0.2], return_previews=True)
    assert [p.shape[-1] for p in previews] == [2, 4]
    # the coarse preview is stage 0 at t = 0.2 after Euler; its mean is close to (1 - 0.2) * mu
    assert previews[0].mean().item() == pytest.approx(0.8, abs=0.6)


def test_sampler_rejects_wrong_stage_counts():
    model = GaussianVelocity([[1.0, 1.0]], [1.0, 1.0], num_classes=1)
    with pytest.raises(ValueError, match="one entry per stage"):
        samplers.sample(model, [torch.zeros(1, 1, 1, 1)] * 2, torch.zeros(1, dtype=torch.long),
                        num_steps_per_scale=[10])
    with pytest.raises(ValueError, match="method"):
        samplers.sample(model, [torch.zeros(1, 1, 1, 1)] * 2, torch.zeros(1, dtype=torch.long),
                        num_steps_per_scale=[10, 1], thresholds=[0.5], method="rk4")

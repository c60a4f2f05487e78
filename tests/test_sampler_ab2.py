"""Adams–Bashforth 2: second order across the DFM hand-over (where it restarts), and one method
object serving many calls with the same results (its state lives in the call, not in the object)."""
import torch

import samplers
from samplers.methods import AdamsBashforth2, build_method

from test_samplers import GaussianVelocity, endpoint_error


class JumpAtHandOver(torch.nn.Module):
    """Two linear-path Gaussian stages whose stage-0 mean jumps from `before` to `after` when stage 1
    becomes active (as a DFM model's velocity of the coarse stage jumps there); the exact endpoint is
    known: the Gaussian flow keeps z = (x - (1 - t) m) / sqrt((1 - t)^2 s^2 + t^2) along a trajectory."""

    num_stages, num_classes = 2, 1

    def __init__(self, before=3.0, after=-3.0, stds=(0.3, 0.8), stage1_mean=0.25):
        super().__init__()
        self.before, self.after, self.stds, self.stage1_mean = before, after, stds, stage1_mean
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    @staticmethod
    def velocity(x, t, m, s):
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        return (t - (1 - t) * s ** 2) / var * (x - (1 - t) * m) - m

    def forward(self, xs, t, y, active=None):
        t = t.to(torch.float64)
        later = active[..., 1].any() if active is not None else True
        m0 = self.after if bool(later) else self.before
        return [self.velocity(xs[0], t[:, 0].view(-1, 1, 1, 1), m0, self.stds[0]),
                self.velocity(xs[1], t[:, 1].view(-1, 1, 1, 1), self.stage1_mean, self.stds[1])]

    def exact(self, noise, tau):
        s0, s1 = self.stds
        scale = ((1 - tau) ** 2 * s0 ** 2 + tau ** 2) ** 0.5
        x_tau = (1 - tau) * self.before + scale * noise[0]
        z_after = (x_tau - (1 - tau) * self.after) / scale
        return [self.after + s0 * z_after, self.stage1_mean + s1 * noise[1]]


def _error(model, method, k):
    g = torch.Generator().manual_seed(1)
    noise = [torch.randn(8, 2, 2, 2, generator=g, dtype=torch.float64),
             torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64)]
    out = samplers.sample(model, noise, torch.zeros(8, dtype=torch.long), num_steps_per_scale=[40 * k, 10 * k],
                          thresholds=[0.1], method=method)
    return max((o.double() - e).abs().max().item() for o, e in zip(out, model.exact(noise, 0.1)))


class NoRestart(AdamsBashforth2):
    def restart(self, ctx, i):
        return i == 0


def test_ab2_is_second_order_across_the_hand_over_because_it_restarts():
    model = JumpAtHandOver()
    errors = [_error(model, "ab2", k) for k in (1, 2, 4)]
    assert all(3.3 < a / b < 4.8 for a, b in zip(errors, errors[1:])), errors  # h^2
    euler = _error(model, "euler", 4)
    assert errors[-1] < euler / 10
    # carrying the velocity of before the jump across it costs an order: the restart is what keeps it
    stale = [_error(model, NoRestart(), k) for k in (2, 4)]
    assert stale[0] / stale[1] < 2.6 and stale[1] > 3 * errors[-1], (stale, errors)


def test_ab2_is_second_order_on_one_stage():
    model = GaussianVelocity([[1.5]], [0.5], num_classes=1)
    noise = [torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(0))]
    y = torch.zeros(32, dtype=torch.long)
    errors = [endpoint_error(model, noise, y, num_steps_per_scale=[n], method="ab2") for n in (10, 20, 40)]
    assert all(3.3 < a / b < 4.8 for a, b in zip(errors, errors[1:])), errors


def test_one_method_object_serves_many_calls_identically():
    method = build_method("ab2")
    model = JumpAtHandOver()
    g = torch.Generator().manual_seed(2)
    first = [torch.randn(4, 2, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)]
    other = [torch.randn(4, 2, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)]
    y = torch.zeros(4, dtype=torch.long)

    def run(noise):
        return samplers.sample(model, noise, y, num_steps_per_scale=[8, 4], thresholds=[0.1], method=method)

    a = run(first)
    run(other)  # a call in between with other states
    b = run(first)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert vars(method) == {}  # nothing of a call is kept on the object

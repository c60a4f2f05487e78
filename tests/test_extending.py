"""The worked examples of docs/EXTENDING.md, registered from this file and run through the whole pipeline.

One of each kind of idea, each one class registered by name (here under an `example_` name, so
that the test never collides with an entry the codebase may add later):

- a decomposition: the orthonormal Haar wavelet (`decomposition: example_haar`), usable with 2 or
  more stages, whose detail stages have 3C channels; and a Gaussian (blur) pyramid holding a kernel
  tensor (`example_gauss`), which the decomposition contract keeps usable on the meta device and
  on any data device;
- a time distribution with two parameters: Beta(a, b) (`time_distribution: {name: example_beta, a:
  2.0, b: 1.5}`), drawn through `generator_as_global` (torch's Beta takes no generator);
- a block part: a SwiGLU MLP (`model_overrides: {mlp: example_swiglu}`);
- a sampler method: the explicit midpoint rule (`method: example_midpoint`).

For each: train a few steps, kill and resume bit-exactly, sample with generate.py, evaluate during
training, `stage_scales: auto` (it measures the decomposition the model uses), count the FLOPs,
export `.safetensors` and load them. These tests keep the extension points open.
"""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfm import DECOMPOSITIONS, TIME_DISTRIBUTIONS, Decomposition, TimeDistribution, generator_as_global
from models.blocks import MLPS
from samplers.methods import SAMPLER_METHODS, SamplerMethod

from train_helpers import check_whole_pipeline, tiny_config


# ------------------------------------------------------------------------------ the four examples
class HaarWavelet(Decomposition):
    """Orthonormal 2-D Haar wavelet: stage 0 is the low-pass band after S - 1 levels, stage s >= 1
    the three detail bands (3C channels) of level S - s."""

    def __init__(self, num_stages: int, scales=None):
        super().__init__(num_stages, scales)

    def level_shapes(self, shape):
        C, H, W = shape
        f = 2 ** (self.num_stages - 1)
        if H % f or W % f:
            raise ValueError(f"a {self.num_stages}-stage Haar wavelet needs sides divisible by {f}, got {H}x{W}")
        return [(C, H // f, W // f)] + [(3 * C, H >> (self.num_stages - s), W >> (self.num_stages - s))
                                        for s in range(1, self.num_stages)]

    def split(self, x):
        details, cur = [], x
        for _ in range(self.num_stages - 1):
            a, b = cur[..., 0::2, 0::2], cur[..., 0::2, 1::2]
            c, d = cur[..., 1::2, 0::2], cur[..., 1::2, 1::2]
            details.insert(0, torch.cat([a - b + c - d, a + b - c - d, a - b - c + d], dim=1) / 2)
            cur = (a + b + c + d) / 2
        return [cur] + details

    def merge(self, levels):
        cur = levels[0]
        for detail in levels[1:]:
            lh, hl, hh = detail.chunk(3, dim=1)
            B, C, h, w = cur.shape
            out = cur.new_empty(B, C, 2 * h, 2 * w)
            out[..., 0::2, 0::2] = (cur + lh + hl + hh) / 2
            out[..., 0::2, 1::2] = (cur - lh + hl - hh) / 2
            out[..., 1::2, 0::2] = (cur + lh - hl - hh) / 2
            out[..., 1::2, 1::2] = (cur - lh - hl + hh) / 2
            cur = out
        return cur


class GaussianPyramid(Decomposition):
    """A Gaussian (blur) pyramid: stage 0 the blurred, subsampled image after S - 1 levels, stage s >= 1
    the detail the blur removed at level S - s. Its 5x5 binomial kernel is a tensor made in __init__:
    it must hold values when the model is built on the meta device and follow the data's device."""

    def __init__(self, num_stages: int, scales=None):
        super().__init__(num_stages, scales)
        k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
        self.kernel = torch.outer(k, k)[None, None]

    def level_shapes(self, shape):
        C, H, W = shape
        f = 2 ** (self.num_stages - 1)
        if H % f or W % f:
            raise ValueError(f"a {self.num_stages}-stage Gaussian pyramid needs sides divisible by {f}, got {H}x{W}")
        return [(C, H >> (self.num_stages - 1 - s), W >> (self.num_stages - 1 - s)) for s in range(self.num_stages)]

    def _blur(self, x):
        C = x.shape[1]
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.kernel.to(x.dtype).expand(C, 1, 5, 5), groups=C)

    def _up(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest")

    def split(self, x):
        levels, cur = [], x
        for _ in range(self.num_stages - 1):
            low = self._blur(cur)[..., ::2, ::2]
            levels.insert(0, cur - self._up(low))
            cur = low
        return [cur] + levels

    def merge(self, levels):
        cur = levels[0]
        for detail in levels[1:]:
            cur = self._up(cur) + detail
        return cur


class BetaTimes(TimeDistribution):
    """Beta(a, b) times (b < a: noisier); torch's Beta sampler takes no generator, so it draws
    through generator_as_global (a private stream seeded from the run's)."""

    def __init__(self, path=None, a: float = 2.0, b: float = 1.0):
        if not (a > 0 and b > 0):
            raise ValueError(f"time distribution 'example_beta': a and b must be > 0, got {a}, {b}")
        super().__init__(path)
        self.dist = torch.distributions.Beta(torch.tensor(float(a)), torch.tensor(float(b)))

    def __call__(self, shape, device=None, generator=None):
        with generator_as_global(generator):
            return self.dist.sample(shape).to(device)


class SwiGLU(nn.Module):
    """SwiGLU MLP: fc1 makes a value and a gate half, fc2 maps silu(gate) * value back; `width`
    scales the hidden size (2/3 keeps the GELU MLP's parameter count)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, width: float = 2 / 3):
        super().__init__()
        inner = int(hidden * width)
        self.fc1 = nn.Linear(dim, 2 * inner, bias=bias)
        self.fc2 = nn.Linear(inner, dim, bias=bias)

    def forward(self, x):
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


class Midpoint(SamplerMethod):
    """Explicit midpoint rule (second order): a half Euler step, then the full step with the
    velocity at the midpoint (NFE = 2N)."""

    def nfe(self, num_steps: int) -> int:
        return 2 * num_steps

    def step(self, ctx, i, xs):
        t_cur, t_next, on = ctx.times[i], ctx.times[i + 1], ctx.active[i]
        v = ctx.velocity(xs, i, i)
        t_mid = (t_cur + t_next) / 2
        half = [x + (t_mid[s] - t_cur[s]) * vs if on[s] else x for s, (x, vs) in enumerate(zip(xs, v))]
        v_mid = ctx.velocity_at(half, t_mid, i)
        return [x + (t_next[s] - t_cur[s]) * vs if on[s] else x for s, (x, vs) in enumerate(zip(xs, v_mid))]


EXAMPLES = [(DECOMPOSITIONS, "example_haar", HaarWavelet), (DECOMPOSITIONS, "example_gauss", GaussianPyramid),
            (TIME_DISTRIBUTIONS, "example_beta", BetaTimes),
            (MLPS, "example_swiglu", SwiGLU), (SAMPLER_METHODS, "example_midpoint", Midpoint)]


@pytest.fixture(scope="module", autouse=True)
def registered():
    for registry, name, entry in EXAMPLES:
        registry.register(name, replace=True)(entry)
    yield
    for registry, name, _ in EXAMPLES:
        registry.unregister(name)


# ------------------------------------------------------------------------------ units
@pytest.mark.parametrize("stages", [2, 3])
def test_haar_levels_against_an_independent_transform(stages):
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    haar = HaarWavelet(stages)
    levels = haar.decompose(x)
    assert [tuple(v.shape[1:]) for v in levels] == haar.level_shapes((3, 16, 16))
    torch.testing.assert_close(haar.recompose(levels), x, rtol=0, atol=1e-12)
    # orthonormal: energy is kept, and the low-pass band is 2^(S-1) times the block mean
    assert sum(float((v ** 2).sum()) for v in levels) == pytest.approx(float((x ** 2).sum()), rel=1e-12)
    f = 2 ** (stages - 1)
    torch.testing.assert_close(levels[0], F.avg_pool2d(x, f) * f, rtol=0, atol=1e-12)


def test_a_decomposition_keeps_its_tensors_through_meta_builds_and_devices():
    """The contract of dfm/decompositions.py: built with values inside a meta-device model build, its
    tensors follow the data (a pass on the meta device loses nothing), no trained state allowed."""
    from models.registry import skeleton_model

    skeleton = skeleton_model("DFM-SiT-S/2", input_size=16, decomposition="example_gauss")
    gauss = skeleton.decomposition
    assert gauss.kernel.device.type == "cpu" and float(gauss.kernel.sum()) == pytest.approx(1.0)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(gauss.recompose(gauss.decompose(x)), x, rtol=0, atol=1e-12)
    gauss.decompose(torch.empty(2, 4, 16, 16, device="meta"))  # e.g. a FLOP count on the meta device
    assert gauss.kernel.device.type == "meta"
    torch.testing.assert_close(gauss.recompose(gauss.decompose(x)), x, rtol=0, atol=1e-12)  # values are back
    with pytest.raises(ValueError, match="attribute 'weight' is a Parameter; a decomposition holds no trained state"):
        gauss.weight = torch.nn.Parameter(torch.ones(1))


def test_beta_times_follow_the_beta_law_and_leave_the_global_stream_alone():
    from scipy import stats

    dist = TIME_DISTRIBUTIONS.build({"name": "example_beta", "a": 2.0, "b": 1.5}, path=None)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    t = dist((4000,), None, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)  # the label-dropout stream is untouched
    assert stats.kstest(t.numpy(), stats.beta(2.0, 1.5).cdf).pvalue > 1e-3
    again = dist((4000,), None, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)  # a pure function of the run's generator


def test_midpoint_is_at_least_second_order():
    from test_samplers import GaussianVelocity, endpoint_error

    model = GaussianVelocity([[0.5], [-1.0], [2.0]], [0.3])
    noise = [torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)]
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    errors = [endpoint_error(model, noise, y, num_steps_per_scale=[n], method="example_midpoint") for n in (8, 16, 32)]
    euler = endpoint_error(model, noise, y, num_steps_per_scale=[32], method="euler")
    assert errors[2] < euler / 100
    assert all(a / b > 3.5 for a, b in zip(errors, errors[1:])), errors  # error ~ h^2 (or better)


def test_swiglu_flops_are_counted_from_its_own_layers():
    from bench.flops import counted_forward_flops
    from conftest import tiny_model

    gelu, swiglu = tiny_model("SiT-S/2"), tiny_model("SiT-S/2", mlp="example_swiglu")
    D, T, L, hidden = 64, 16, 2, 256  # tiny_model: width 64, a 4x4 token grid, 2 blocks, mlp_ratio 4
    inner = int(hidden * 2 / 3)
    per_token = 2 * (D * 2 * inner + inner * D) - 2 * (2 * D * hidden)  # SwiGLU minus GELU matmuls
    assert counted_forward_flops(swiglu) - counted_forward_flops(gelu) == L * T * per_token


def test_unknown_names_and_parameters_are_one_line(tmp_path, tiny_data):
    from training.config import ConfigError

    registered = re.escape(", ".join(DECOMPOSITIONS.names()))  # whatever else this checkout registers
    with pytest.raises(ConfigError, match=r"unknown decomposition 'example_har' \(did you mean 'example_haar'\?\); "
                                          rf"registered in this checkout: {registered}"):
        tiny_config(tiny_data, str(tmp_path), decomposition="example_har")
    with pytest.raises(ConfigError, match=r"time distribution 'example_beta' takes no parameter 'c'; its "
                                          r"parameters: a: float = 2.0, b: float = 1.0"):
        tiny_config(tiny_data, str(tmp_path), time_distribution="{name: example_beta, c: 1}")
    with pytest.raises(ConfigError, match=r"MLP 'example_swiglu': parameter 'width' must be a finite number"):
        tiny_config(tiny_data, str(tmp_path), model_overrides="{depth: 2, hidden_size: 64, num_heads: 4, "
                                                              "mlp: {name: example_swiglu, width: wide}}")
    with pytest.raises(ConfigError, match=r"preview.method: unknown sampler method 'midpoint'"):
        tiny_config(tiny_data, str(tmp_path), **{"preview.method": "midpoint"})


# ------------------------------------------------------------------------------ the whole pipeline
IDEAS = {
    "decomposition": dict(decomposition="example_haar", stage_scales="auto"),
    "decomposition_with_a_kernel": dict(decomposition="example_gauss", stage_scales="auto"),
    "time_distribution": dict(time_distribution="{name: example_beta, a: 2.0, b: 1.5}"),
    "mlp": dict(model_overrides="{depth: 2, hidden_size: 64, num_heads: 4, mlp: {name: example_swiglu, width: 0.5}}"),
    "sampler": {"preview.method": "example_midpoint", "eval_sampler.method": "example_midpoint"},
}


@pytest.mark.parametrize("idea", sorted(IDEAS))
def test_each_idea_runs_through_the_whole_pipeline(idea, tiny_data, tmp_path):
    method = "example_midpoint" if idea == "sampler" else "euler"
    ckpt = check_whole_pipeline(tiny_data, tmp_path, IDEAS[idea], methods=(method,))["ckpt"]
    if idea == "decomposition":  # auto measured the Haar levels the model trains on, and stored them
        scales = ckpt["arch"]["stage_scales"]
        assert ckpt["arch"]["decomposition"] == "example_haar" and scales[0] == 1.0 and scales[1] > 1.0


def test_a_checkpoint_of_an_entry_this_checkout_lacks_is_one_line(tiny_data, tmp_path, capsys):
    import generate
    from models import load_pretrained
    from training.config import ConfigError
    from training.loop import train

    keys = dict(model_overrides="{depth: 2, hidden_size: 64, num_heads: 4, mlp: example_swiglu}", max_train_steps=2)
    result = train(tiny_config(tiny_data, str(tmp_path), exp_name="swiglu", **keys))
    MLPS.unregister("example_swiglu")
    try:
        with pytest.raises(ValueError) as info:
            load_pretrained(result.last_checkpoint)
        assert str(info.value).startswith("the architecture stored in the checkpoint (DFM-SiT-S/4) cannot be built: "
                                          "unknown MLP 'example_swiglu'; registered in this checkout: "
                                          + ", ".join(MLPS.names()))
        assert generate.main(["--ckpt", result.last_checkpoint, f"sample_dir={tmp_path / 's'}"]) == 2
        assert "unknown MLP 'example_swiglu'" in capsys.readouterr().err
        with pytest.raises(ConfigError, match="unknown MLP 'example_swiglu'"):
            tiny_config(tiny_data, str(tmp_path), exp_name="swiglu", **keys)
    finally:
        MLPS.register("example_swiglu", replace=True)(SwiGLU)


def test_reference_sampler_aliases_leave_a_method_of_ones_own_alone():
    from generation.config import load_generate_config

    def method(*argv):
        return load_generate_config(["--ckpt=x.pt", *argv]).method

    assert method("method=example_midpoint", "mode=ode", "heun=false") == "example_midpoint"
    assert method("method=sde", "mode=ode") == "euler" and method("method=heun", "heun=false") == "euler"
    assert method("mode=sde", "heun=true") == "sde" and method("heun=true") == "heun"


# ------------------------------------------------------------------ the traps of the second try, closed
def test_a_name_given_with_a_stored_arch_keeps_every_stored_setting(tmp_path):
    from conftest import randomize_, tiny_model
    from models import load_pretrained

    model = randomize_(tiny_model("DFM-SiT-S/2", stage_scales=[1.0, 3.0], mlp="example_swiglu"))
    path = tmp_path / "m.pt"
    torch.save({"ema": model.state_dict(), "arch": model.arch}, path)
    loaded = load_pretrained(str(path), name="DFM-SiT-S/2")  # the stored scales and MLP come along
    assert loaded.stage_scales == [1.0, 3.0] and loaded.arch["mlp"] == "example_swiglu"
    with pytest.raises(ValueError, match=r"the checkpoint holds a DFM-SiT-S/2 model \(its stored arch\), not SiT-S/2"):
        load_pretrained(str(path), name="SiT-S/2")


def test_foreign_weights_of_an_unknown_width_need_their_heads_and_keep_their_mlp_width(tmp_path):
    from conftest import randomize_, tiny_model
    from models import load_pretrained

    model = randomize_(tiny_model("SiT-S/2", hidden_size=56, num_heads=4, mlp_ratio=61.3 / 56))  # fc1: 61 rows
    assert model.blocks[0].mlp.fc1.out_features == 61  # and 61 / 56 * 56 = 60.99999...: int() gives 60
    path = tmp_path / "foreign.pt"
    torch.save({"ema": model.state_dict()}, path)  # no arch: a foreign checkpoint
    with pytest.raises(ValueError, match=r"its width 56 is none of SiT's sizes .* pass it: "
                                         r"load_pretrained\(path, num_heads=N\)"):
        load_pretrained(str(path))
    loaded = load_pretrained(str(path), num_heads=4)
    assert loaded.blocks[0].mlp.fc1.out_features == 61 and loaded.blocks[0].attn.num_heads == 4
    x = [torch.randn(2, *s) for s in model.stage_shapes]
    t, y = torch.rand(2), torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(loaded(x[0], t, y), model.eval()(x[0], t, y))


def test_the_time_shift_of_a_distribution_that_returns_0_or_1_stays_finite():
    from dfm import FlowMatchingObjective

    class Edges(TimeDistribution):
        def __call__(self, shape, device=None, generator=None):
            return torch.tensor([0.0, 1.0] * (shape[0] // 2))

    TIME_DISTRIBUTIONS.register("example_edges", replace=True)(Edges)
    try:
        objective = FlowMatchingObjective(2, stage_weights=[0.5, 0.5], stage_sampling="per_sample",
                                          time_distribution="example_edges", stage_time_shift=[1.0, -1.0])
        t, active = objective.sample_times(8, generator=torch.Generator().manual_seed(0))
        trained = t[torch.arange(8), active.sum(dim=1) - 1]  # the last active stage of each sample
        assert torch.isfinite(t).all() and (trained > 0).all() and (trained < 1).all()  # logit clamped, not +-inf
    finally:
        TIME_DISTRIBUTIONS.unregister("example_edges")

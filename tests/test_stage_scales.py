"""Stage calibration (`stage_scales`, SPEC §11): the scaled pyramid, the objective, the `auto`
rule, training (bit-identity of `null`, resume), generation with no flag, and bad input."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import randomize_, tiny_model
from dfm import FlowMatchingObjective, LaplacianPyramid, check_stage_scales, measure_stage_scales
from training.config import ConfigError
from training.loop import train

from test_objective import Recorder
from test_pyramid import up_by_hand
from train_helpers import assert_same_weights, load_ckpt, read_losses, tiny_config


# ----------------------------------------------------------------------------- the pyramid

@pytest.mark.parametrize("stages,scales", [(2, [1.0, 4.5]), (3, [0.5, 2.0, 7.25]), (1, [3.0])])
def test_scaled_levels_are_c_times_the_reference_levels_and_round_trip(stages, scales):
    x = torch.randn(3, 4, 16, 16, dtype=torch.float64)
    plain = LaplacianPyramid(stages).decompose(x)
    scaled_pyramid = LaplacianPyramid(stages, scales)
    scaled = scaled_pyramid.decompose(x)
    for level, ref, c in zip(scaled, plain, scales):
        assert torch.equal(level, ref * c)
    torch.testing.assert_close(scaled_pyramid.recompose(scaled), x, rtol=0, atol=1e-12)
    # a partial pyramid (the sampler's stage previews) removes the scales of its own levels only
    for n in range(1, stages + 1):
        torch.testing.assert_close(scaled_pyramid.recompose_first(scaled, n),
                                   LaplacianPyramid(n).recompose(plain[:n]), rtol=0, atol=1e-12)


def test_no_scales_is_the_reference_pyramid_bit_for_bit():
    x = torch.randn(2, 3, 16, 16)
    plain, none = LaplacianPyramid(2), LaplacianPyramid(2, None)
    assert none.scales is None
    for a, b in zip(plain.decompose(x), none.decompose(x)):
        assert torch.equal(a, b)
    levels = plain.decompose(x)
    assert torch.equal(plain.recompose(levels), none.recompose(levels))


@pytest.mark.parametrize("bad", [[1.0], [1.0, 2.0, 3.0], [1.0, 0.0], [1.0, -2.0], [1.0, float("nan")],
                                 [1.0, float("inf")], [True, 2.0], "auto", 3.0, ["a", 1.0]])
def test_bad_scales_are_refused(bad):
    with pytest.raises(ValueError, match="stage_scales"):
        check_stage_scales(bad, 2)


# ----------------------------------------------------------------------------- the objective

def test_objective_without_scales_is_unchanged_and_with_scales_trains_on_c_times_P():
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)
    pred = [torch.randn(8, 3, 4, 4, dtype=torch.float64), torch.randn(8, 3, 8, 8, dtype=torch.float64)]
    kwargs = dict(stage_weights=[0.5, 0.5], stage_sampling="per_sample")

    def run(**extra):  # the objective decomposes with the model's decomposition (and its scales)
        model = Recorder(2, lambda xs, t: pred)
        if extra:
            model.decomposition = LaplacianPyramid(2, extra["stage_scales"])
        out = FlowMatchingObjective(2, **kwargs)(model, x, y, generator=torch.Generator().manual_seed(4))
        return model, out

    base_model, base = run()
    for extra in ({"stage_scales": None}, {"stage_scales": [1.0, 1.0]}):
        model, out = run(**extra)
        assert torch.equal(out["loss"], base["loss"])
        assert all(torch.equal(a, b) for a, b in zip(model.xs, base_model.xs))

    scales = [1.0, 4.5]
    model, out = run(stage_scales=scales)
    levels = [P * c for P, c in zip(LaplacianPyramid(2).decompose(x), scales)]
    t, active = model.t, model.active
    assert torch.equal(t, base_model.t)  # the same draws: only the signal changed
    per_sample = torch.zeros(8, dtype=torch.float64)
    for s in range(2):
        ts = t[:, s].view(-1, 1, 1, 1).double()
        eps = (base_model.xs[s] - (1 - ts) * LaplacianPyramid(2).decompose(x)[s]) / ts  # the draw's noise
        torch.testing.assert_close(model.xs[s], (1 - ts) * levels[s] + ts * eps, rtol=0, atol=1e-12)
        per_sample += ((pred[s] - (eps - levels[s])) ** 2).mean(dim=(1, 2, 3)) * active[:, s]
    assert out["loss"].item() == pytest.approx(per_sample.mean().item(), rel=1e-9)


# ----------------------------------------------------------------------------- the auto rule

def test_auto_rule_against_an_independent_pyramid():
    """c_s = RMS(level 0) / RMS(level s), levels by 2x2 average pooling and a hand-written bilinear x2."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64).cumsum(-1).cumsum(-2) * 0.1  # smooth data
    batches = [x[:4], x[4:]]
    got = measure_stage_scales(batches, LaplacianPyramid(3))
    levels, cur = [], x
    for _ in range(2):
        low = F.avg_pool2d(cur, 2)
        levels.insert(0, cur - up_by_hand(low))
        cur = low
    levels.insert(0, cur)
    rms = [math.sqrt(float((level.numpy() ** 2).mean())) for level in levels]
    assert got == [round(rms[0] / r, 4) for r in rms] and got[0] == 1.0 and got[2] > got[1] > 1


def test_auto_rule_refuses_a_level_without_signal():
    with pytest.raises(ValueError, match="nothing to calibrate"):
        measure_stage_scales([torch.ones(2, 3, 8, 8)], LaplacianPyramid(2))  # constant images: the fine level is 0


# ----------------------------------------------------------------------------- training

def _independent_auto_scales(data_dir):
    """RMS ratio of the demo images' two levels, read with PIL (the tiny set has < 1024 items: all are used)."""
    images = [np.asarray(Image.open(os.path.join(root, f)).convert("RGB"), dtype=np.float64)
              for root, _, files in os.walk(data_dir) for f in files if f.endswith(".png")]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    low = F.avg_pool2d(x, 2)
    fine, coarse = x - up_by_hand(low), low
    return [1.0, round(math.sqrt(float((coarse ** 2).mean())) / math.sqrt(float((fine ** 2).mean())), 4)]


def test_null_scales_train_exactly_as_without_the_key(tiny_data, tmp_path):
    a = train(tiny_config(tiny_data, str(tmp_path), exp_name="a", max_train_steps=3))
    b = train(tiny_config(tiny_data, str(tmp_path), exp_name="b", max_train_steps=3, stage_scales="null"))
    assert read_losses(a.exp_dir) == read_losses(b.exp_dir)
    ca, cb = load_ckpt(a.last_checkpoint), load_ckpt(b.last_checkpoint)
    assert_same_weights(ca, cb)
    assert "stage_scales" not in ca["arch"] and ca["arch"] == cb["arch"]


def test_auto_is_measured_once_stored_and_survives_resume(tiny_data, tmp_path, monkeypatch):
    out = str(tmp_path)
    steps = dict(max_train_steps=5, checkpointing_steps=2, stage_scales="auto", save_format="safetensors")
    straight = train(tiny_config(tiny_data, out, exp_name="straight", **steps))
    expected = _independent_auto_scales(tiny_data)
    ref = load_ckpt(straight.last_checkpoint)
    assert ref["arch"]["stage_scales"] == expected and ref["config"]["stage_scales"] == expected
    assert f"stage_scales auto: {expected}" in open(os.path.join(straight.exp_dir, "log.txt")).read()
    # a second fresh run measures the same numbers (a pure function of the data and the seed)
    again = train(tiny_config(tiny_data, out, exp_name="again", max_train_steps=1, stage_scales="auto"))
    assert load_ckpt(again.last_checkpoint)["arch"]["stage_scales"] == expected
    # killed after step 3, resumed: the scales come from the checkpoint (nothing is measured again)
    train(tiny_config(tiny_data, out, exp_name="cut", **steps), stop_after_step=3)
    import training.calibration as calibration

    def no_measuring(*args, **kwargs):
        raise AssertionError("a resumed run measured the stage scales again")

    monkeypatch.setattr(calibration, "measure_dataset_scales", no_measuring)
    resumed = train(tiny_config(tiny_data, out, exp_name="cut", **steps))
    got = load_ckpt(resumed.last_checkpoint)
    assert_same_weights(got, ref)
    assert read_losses(resumed.exp_dir) == read_losses(straight.exp_dir)
    # the exported weights carry them too
    import models

    exported = os.path.join(straight.exp_dir, "weights", "0000005.safetensors")
    assert models.load_pretrained(exported).stage_scales == expected


def test_resuming_with_the_same_explicit_scales_continues_the_run(tiny_data, tmp_path):
    out = str(tmp_path)
    steps = dict(max_train_steps=4, checkpointing_steps=2, stage_scales="[1,3]")
    straight = train(tiny_config(tiny_data, out, exp_name="straight", **steps))
    train(tiny_config(tiny_data, out, exp_name="cut", **steps), stop_after_step=2)
    resumed = train(tiny_config(tiny_data, out, exp_name="cut", **steps))
    assert load_ckpt(resumed.last_checkpoint)["arch"]["stage_scales"] == [1.0, 3.0]
    assert_same_weights(load_ckpt(resumed.last_checkpoint), load_ckpt(straight.last_checkpoint))
    assert read_losses(resumed.exp_dir) == read_losses(straight.exp_dir)


def test_resuming_with_other_scales_is_one_error(tiny_data, tmp_path):
    out = str(tmp_path)
    train(tiny_config(tiny_data, out, exp_name="run", max_train_steps=2, **{"stage_scales": "[1,3]"}))
    for value, stored in (("[1,2]", r"\[1.0, 3.0\]"), ("null", r"\[1.0, 3.0\]")):
        with pytest.raises(ConfigError, match=rf"stage_scales=.* resumed was trained with {stored}"):
            train(tiny_config(tiny_data, out, exp_name="run", max_train_steps=4, stage_scales=value))
    train(tiny_config(tiny_data, out, exp_name="plain", max_train_steps=2))
    with pytest.raises(ConfigError, match=r"trained with none \(no stage calibration\)"):
        train(tiny_config(tiny_data, out, exp_name="plain", max_train_steps=4, stage_scales="auto"))


@pytest.mark.parametrize("value,message", [
    ("[1.0]", "one entry per stage"), ("[1.0,2.0,3.0]", "one entry per stage"), ("[1.0,0.0]", "positive"),
    ("[1.0,-4.5]", "positive"), ("[1.0,.nan]", "positive finite"), ("[1.0,.inf]", "positive finite"),
    ("bogus", "null, auto or a list"),
])
def test_bad_stage_scales_are_one_line_before_training(tiny_data, tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tiny_data, str(tmp_path), stage_scales=value)


def test_auto_on_an_empty_dataset_is_one_line(tmp_path):
    from training.calibration import measure_dataset_scales

    with pytest.raises(ConfigError, match="holds no items"):
        measure_dataset_scales([], LaplacianPyramid(2), True, 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dataset.json").write_text('{"labels": []}')
    with pytest.raises(ConfigError):
        train(tiny_config(str(empty), str(tmp_path / "out"), stage_scales="auto"))


# ----------------------------------------------------------------------------- generation

def _scaled_checkpoint(path, scales):
    model = randomize_(tiny_model("DFM-SiT-S/2", in_channels=3, num_classes=4, stage_scales=scales), seed=1)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "arch": model.arch, "steps": 0,
                "config": {"vae": "none", "path_type": "linear"}}, path)
    return str(path), model


def test_generate_samples_with_the_checkpoint_scales_and_refuses_others(tmp_path):
    import samplers
    from data.vae import to_uint8
    from generation.config import GenerateConfig, GenerationError
    from generation.labels import class_labels
    from generation.noise import initial_noise
    from generation.runner import run
    from utils.config import load_config

    ckpt, model = _scaled_checkpoint(tmp_path / "scaled.pt", [1.0, 3.0])

    def generate(**kw):
        opts = dict(num_samples=4, per_proc_batch_size=4, num_steps_per_scale="[3,2]", labels="balanced",
                    run_name="run", sample_dir=str(tmp_path / "out"), precision="fp32", **kw)
        return run(load_config(GenerateConfig, ["--ckpt", ckpt] + [f"{k}={v}" for k, v in opts.items()]))

    summary = generate()  # no flag: the checkpoint's scales
    got = np.stack([np.asarray(Image.open(os.path.join(summary["run_dir"], f"{i:06d}.png"))) for i in range(4)])
    # independently: sample the per-stage states, divide each level by its scale, recompose unscaled
    model.eval()
    noise = initial_noise(0, list(range(4)), model.stage_shapes)
    y = class_labels(4, 4, 0, "balanced")
    final = samplers.sample(model, noise, y, num_steps_per_scale=[3, 2], thresholds=[0.1])
    expected = to_uint8(LaplacianPyramid(2).recompose([final[0] / 1.0, final[1] / 3.0])).numpy()
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, to_uint8(LaplacianPyramid(2).recompose(final)).numpy())
    assert model.decomposition.scales == [1.0, 3.0]

    generate(stage_scales="auto")  # the checkpoint's, as with no key
    for given in ("[1.0,2.0]", "none"):
        with pytest.raises(GenerationError, match=r"stage_scales.*trained with \[1.0, 3.0\]"):
            generate(stage_scales=given)
    for bad in ("5", "bogus"):  # not a list: one line, not a TypeError (nor a list of letters)
        with pytest.raises(GenerationError, match=r"stage_scales': must be null, auto, none or a list"):
            generate(stage_scales=bad)
    plain, _ = _scaled_checkpoint(tmp_path / "plain.pt", None)
    with pytest.raises(GenerationError, match=r"trained with none"):
        run(load_config(GenerateConfig, ["--ckpt", plain, "stage_scales=[1,3]", "num_samples=1",
                                         f"sample_dir={tmp_path / 'o2'}"]))


# ----------------------------------------------------------------------------- per-stage time shift

def test_stage_time_shift_moves_the_trained_stage_logit_normal_only():
    from scipy import stats

    n = 4000
    x = torch.zeros(n, 1, 4, 4)
    model = Recorder(2, lambda xs, t: [torch.zeros_like(v) for v in xs])
    objective = FlowMatchingObjective(2, stage_weights=[0.5, 0.5], stage_sampling="per_sample",
                                      time_distribution="lognormal", stage_time_shift=[0.0, 1.5])
    objective(model, x, torch.zeros(n, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    t, active = model.t.double(), model.active
    trained1 = active[:, 1]
    trained0 = ~active[:, 1]
    logit = torch.log(t / (1 - t))
    assert stats.kstest(logit[trained1, 1].numpy(), stats.norm(loc=1.5).cdf).pvalue > 1e-3
    assert stats.kstest(logit[trained0, 0].numpy(), stats.norm(loc=0.0).cdf).pvalue > 1e-3
    # no shift: the reference draws, bit for bit
    a, b = Recorder(2, model.predict), Recorder(2, model.predict)
    FlowMatchingObjective(2, time_distribution="lognormal")(a, x[:16], torch.zeros(16, dtype=torch.long),
                                                    generator=torch.Generator().manual_seed(1))
    FlowMatchingObjective(2, time_distribution="lognormal", stage_time_shift=None)(
        b, x[:16], torch.zeros(16, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.t, b.t)


def test_bad_stage_time_shift_is_one_line(tiny_data, tmp_path):
    for value in ("[1.0]", "[0.0,.nan]"):
        with pytest.raises(ConfigError, match="stage_time_shift needs 2 finite numbers"):
            tiny_config(tiny_data, str(tmp_path), stage_time_shift=value)

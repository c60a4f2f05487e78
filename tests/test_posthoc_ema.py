"""Post-hoc EMA: the maths against independent computations, reconstruction against a profile tracked
directly, snapshots across kill and resume, the bad inputs."""
import math
import os

import numpy as np
import pytest
import torch
from scipy import integrate

from training.loop import train
from training.posthoc_ema import exponent_to_std, kernel_dot, main, reconstruct, solve_coefficients, std_to_exponent

from train_helpers import load_ckpt, tiny_config


@pytest.mark.parametrize("std", [0.01, 0.05, 0.1, 0.2])
def test_exponent_and_std_against_the_kernel_moments(std):
    gamma = std_to_exponent(std)
    assert exponent_to_std(gamma) == pytest.approx(std, rel=1e-10)
    # the std of the kernel p(tau) = (g+1) tau^g on [0, 1] relative to its length, by quadrature
    mean = integrate.quad(lambda x: x * (gamma + 1) * x ** gamma, 0, 1)[0]
    var = integrate.quad(lambda x: (x - mean) ** 2 * (gamma + 1) * x ** gamma, 0, 1)[0]
    assert math.sqrt(var) == pytest.approx(std, rel=1e-8)


def test_kernel_inner_products_against_quadrature():
    def p(t, g):
        return lambda x: (g + 1) * x ** g / t ** (g + 1) if x <= t else 0.0

    for (ta, ga, tb, gb) in [(100, 6.9, 300, 16.9), (300, 2.0, 300, 6.9), (50, 0.5, 20, 3.0)]:
        want = integrate.quad(lambda x: p(ta, ga)(x) * p(tb, gb)(x), 0, max(ta, tb), limit=200, points=[min(ta, tb)])[0]
        assert float(kernel_dot(ta, ga, tb, gb)) == pytest.approx(want, rel=1e-7)


def _discrete_kernel(gamma, t):
    """w[tau] (tau = 1..t) of the step-wise update ema_t = beta_t ema + (1 - beta_t) theta_t, beta_t = (1 - 1/t)^(g+1)."""
    w = np.zeros(t + 1)
    for step in range(1, t + 1):
        beta = (1 - 1 / step) ** (gamma + 1)
        w *= beta
        w[step] += 1 - beta
    return w[1:]


def test_reconstruction_matches_a_profile_tracked_directly(tiny_data, tmp_path):
    # float32 snapshots: the bookkeeping is checked to float precision (float16 ones: test_posthoc_snapshots.py)
    keys = dict(max_train_steps=20, checkpointing_steps=1, **{"posthoc_ema.every": 2, "posthoc_ema.dtype": "float32"})
    a = train(tiny_config(tiny_data, str(tmp_path), exp_name="a", **keys, **{"posthoc_ema.stds": "[0.05, 0.1]"}))
    b = train(tiny_config(tiny_data, str(tmp_path), exp_name="b", **keys, **{"posthoc_ema.stds": "[0.08]"}))
    [record] = reconstruct(a.exp_dir, [0.08])
    assert record["step"] == 20 and record["kernel_error"] < 0.01 and record["snapshots"] == 10
    got = load_ckpt(b.last_checkpoint)  # the same raw trajectory (profiles never touch training)
    tracked = got["posthoc_ema"]["profiles"][0]
    from models.weights_io import read_weights_file

    recon = read_weights_file(record["path"])["ema"]
    # independently: the step-wise kernels of the snapshots, combined with the tool's coefficients,
    # applied to the raw weights of every step, give the tool's output (the bookkeeping) ...
    thetas = [load_ckpt(os.path.join(a.exp_dir, "checkpoints", f"{s:07d}.pt"))["model"] for s in range(1, 21)]
    snaps = [(t, g) for t in range(2, 21, 2) for g in (std_to_exponent(0.05), std_to_exponent(0.1))]
    kernel = np.zeros(20)
    for (t, g), x in zip(snaps, record["coefficients"]):
        kernel[:t] += x * _discrete_kernel(g, t)
    target = _discrete_kernel(std_to_exponent(0.08), 20)
    # ... and the profile tracked directly is the target kernel applied to them (the training-time update)
    bound = np.abs(kernel - target).sum()
    assert 0 < bound < 0.2
    for key in tracked:
        if not torch.is_floating_point(tracked[key]) or key == "pos_embed":
            continue
        stack = torch.stack([th[key].double() for th in thetas])
        expect_recon = torch.einsum("t,t...->...", torch.from_numpy(kernel), stack)
        expect_tracked = torch.einsum("t,t...->...", torch.from_numpy(target), stack)
        torch.testing.assert_close(recon[key].double(), expect_recon, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tracked[key].double(), expect_tracked, rtol=1e-5, atol=1e-6)
        # the reconstruction differs from the tracked profile by at most the kernels' L1 distance x max|theta|
        limit = bound * stack.abs().amax(dim=0) + 1e-6
        assert torch.all((recon[key].double() - tracked[key].double()).abs() <= limit), key


def test_snapshots_survive_kill_and_resume_and_generate_reads_a_reconstruction(tiny_data, tmp_path):
    keys = dict(max_train_steps=8, checkpointing_steps=4, **{"posthoc_ema.every": 2, "posthoc_ema.stds": "[0.05, 0.1]"})
    straight = train(tiny_config(tiny_data, str(tmp_path), exp_name="straight", **keys))
    train(tiny_config(tiny_data, str(tmp_path), exp_name="cut", **keys), stop_after_step=7)  # killed after step 7
    resumed = train(tiny_config(tiny_data, str(tmp_path), exp_name="cut", **keys))  # from step 4
    from models.weights_io import read_weights_file

    for step in (2, 4, 6, 8):  # every snapshot, the ones rewritten after the resume included
        name = f"posthoc_ema/{step:07d}.safetensors"
        x, y = (read_weights_file(os.path.join(run.exp_dir, name)) for run in (straight, resumed))
        assert x["weights_info"].pop("run") != y["weights_info"].pop("run")  # two runs, two identities
        assert x["weights_info"] == y["weights_info"] and x["steps"] == y["steps"] == step
        assert all(torch.equal(x[g][k], y[g][k]) for g in ("p0", "p1") for k in x[g]), name
    a, b = load_ckpt(straight.last_checkpoint), load_ckpt(resumed.last_checkpoint)
    runs = {read_weights_file(os.path.join(resumed.exp_dir, f"posthoc_ema/{s:07d}.safetensors"))["weights_info"]["run"]
            for s in (2, 4, 6, 8)}
    assert runs == {b["posthoc_ema"]["run"]}  # the identity made at the start survived the kill and the resume
    for x, y in zip(a["posthoc_ema"]["profiles"], b["posthoc_ema"]["profiles"]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    [record] = reconstruct(straight.exp_dir, [0.07])
    from generation.config import load_generate_config
    from generation.runner import run

    summary = run(load_generate_config([f"--ckpt={record['path']}", "num_samples=2", "num_steps_per_scale=[2,2]",
                                        f"sample_dir={tmp_path / 's'}", "save_png=false"]))
    assert np.load(summary["npz"])["arr_0"].shape == (2, 16, 16, 3)


def test_bad_inputs_are_one_line_and_write_nothing(tiny_data, tmp_path, capsys):
    plain = train(tiny_config(tiny_data, str(tmp_path), exp_name="plain", max_train_steps=2))
    capsys.readouterr()
    assert main([plain.exp_dir, "--std", "0.05"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"posthoc_ema: error: {plain.exp_dir} holds no post-hoc EMA snapshots ({plain.exp_dir}/posthoc_ema/"
        "<step>.safetensors): train with posthoc_ema.stds (e.g. [0.05, 0.10]) to keep them")
    run = train(tiny_config(tiny_data, str(tmp_path), exp_name="ph", max_train_steps=8,
                            **{"posthoc_ema.every": 2, "posthoc_ema.stds": "[0.05, 0.1]"}))
    capsys.readouterr()
    assert main([run.exp_dir, "--std", "0.004"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("posthoc_ema: error: --std 0.004: the stored profiles ([0.05, 0.1], 4 snapshots up to step 8) "
                          "reconstruct it only with a ") and "reachable here: " in err
    assert not os.path.exists(os.path.join(run.exp_dir, "posthoc_ema", "reconstructed"))
    snapshot = os.path.join(run.exp_dir, "posthoc_ema", "0000004.safetensors")
    with open(snapshot, "r+b") as f:
        f.write(b"\x00garbage")
    assert main([run.exp_dir, "--std", "0.07"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"posthoc_ema: error: post-hoc EMA snapshot {snapshot} is damaged")
    assert not os.path.exists(os.path.join(run.exp_dir, "posthoc_ema", "reconstructed"))


def test_bad_keys_and_a_changed_profile_on_resume(tiny_data, tmp_path):
    from training.config import ConfigError

    for stds in ("[0.5]", "[0.05, 0.05]", "[-0.1]", "[1e-300]", "[.nan]"):
        with pytest.raises(ConfigError, match=r"posthoc_ema.stds must be distinct numbers in \[0.001, 0.28\]"):
            tiny_config(tiny_data, str(tmp_path), **{"posthoc_ema.stds": stds})
    with pytest.raises(ConfigError, match=r"posthoc_ema.keep must be an integer >= 0, got -1"):
        tiny_config(tiny_data, str(tmp_path), **{"posthoc_ema.stds": "[0.05]", "posthoc_ema.keep": -1})
    with pytest.raises(ConfigError, match=r"posthoc_ema.dtype must be one of \['float16', 'float32'\], got 'bfloat16'"):
        tiny_config(tiny_data, str(tmp_path), **{"posthoc_ema.stds": "[0.05]", "posthoc_ema.dtype": "bfloat16"})
    train(tiny_config(tiny_data, str(tmp_path), exp_name="r", max_train_steps=2, **{"posthoc_ema.stds": "[0.05]"}))
    with pytest.raises(ConfigError, match=r"resume: posthoc_ema.stds=\[0.1\], but checkpoint .* holds the profiles of "
                                          r"\[0.05\]"):
        train(tiny_config(tiny_data, str(tmp_path), exp_name="r", max_train_steps=4, **{"posthoc_ema.stds": "[0.1]"}))


def test_solve_reproduces_a_stored_profile_exactly():
    times = [t for t in range(100, 1001, 100) for _ in range(2)]
    gammas = [std_to_exponent(s) for _ in range(10) for s in (0.05, 0.1)]
    x, error = solve_coefficients(times, gammas, 1000, std_to_exponent(0.1))
    assert error < 1e-6 and x[-1] == pytest.approx(1.0, abs=1e-6) and np.abs(x[:-1]).max() < 1e-6


def test_two_processes_with_an_elit_model_keep_the_same_profiles(tiny_data, tmp_path):
    """DDP (2 gloo processes) and a multi-budget DFM-ELIT model, skip mode on: the profiles are
    updated identically on both ranks (the checkpoint's rank check), rank 0 writes the snapshots,
    and the reconstruction loads as an ELIT model."""
    from train_helpers import run_torchrun, tiny_argv

    argv = tiny_argv(tiny_data, str(tmp_path), exp_name="ddp", model="DFM-ELIT-SiT-S/4",
                     model_overrides="{depth: 4, hidden_size: 64, num_heads: 4}", encoder_depth=1, group_size=2,
                     elit_max_mask_prob=0.75, **{"model_overrides.elit_tail_depth": 1, "posthoc_ema.stds": "[0.05,0.1]",
                                                 "posthoc_ema.every": 2, "preview.budgets": "[1.0]"},
                     max_train_steps=6, checkpointing_steps=6, on_nonfinite="skip")
    done = run_torchrun(argv, nproc=2)
    assert done.returncode == 0, done.stderr[-2000:]
    run = str(tmp_path / "ddp")
    assert sorted(os.listdir(os.path.join(run, "posthoc_ema"))) == [f"{s:07d}.safetensors" for s in (2, 4, 6)]
    [record] = reconstruct(run, [0.07])
    from models import load_pretrained

    model = load_pretrained(record["path"])
    assert model.arch["name"] == "DFM-ELIT-SiT-S/4" and model.num_stages == 2 and model.elit_max_mask_prob == 0.75
    assert load_ckpt(os.path.join(run, "checkpoints", "0000006.pt"))["posthoc_ema"]["t"] == 6

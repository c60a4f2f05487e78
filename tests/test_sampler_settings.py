"""Sampler settings are checked before any work, by one function (samplers.check_sampler_settings) that
every entry point calls: generate.py and the budget sweep (generation.config.resolve_config), the
previews and the evaluation during training (training.previews.check_sampler_keys). The case that
slipped through: an SDE whose last noisy time is past the DFM hand-over threshold, a ValueError
traceback after generate.py had written its run folder and an incomplete provenance record."""
import pytest
import torch

from conftest import randomize_, tiny_model
from samplers import check_sampler_settings, sample

LATE_SDE = "{name: sde, last_noisy_time: 0.2}"  # the hand-over threshold is 0.1


def test_the_check_builds_the_schedule_the_sampler_would():
    assert check_sampler_settings("euler", [3, 2], [0.1], 2) == "euler"
    assert check_sampler_settings({"name": "sde", "last_noisy_time": 0.05}, [3, 3], [0.1], 2) == \
        {"name": "sde", "last_noisy_time": 0.05}
    cases = [
        (({"name": "sde", "last_noisy_time": 0.2}, [3, 3], [0.1], 2),
         "method sde(last_noisy_time=0.2) cannot sample num_steps_per_scale=[3, 3] with thresholds=[0.1]: "
         "thresholds must stay above the SDE's last noisy time 0.2, got [0.1]"),
        (("sde", [3, 1], [0.1], 2), "method sde cannot sample num_steps_per_scale=[3, 1] with thresholds=[0.1]: "
                                    "the SDE sampler needs at least 2 steps in the last stage"),
        (("dpm", [3], [], 1), "method: unknown sampler method 'dpm'"),
        (("euler", [3], [], 2), "num_steps_per_scale needs 2 positive entries (one per stage), got [3]"),
        (("euler", [3, 2], [0.1, 0.05], 2), "thresholds needs 1 entries for 2 stage(s), got [0.1, 0.05]"),
        (("euler", [3, 2], [1.5], 2), "thresholds must be strictly decreasing values in (0, 1), got [1.5]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as info:
            check_sampler_settings(*args)
        assert str(info.value).startswith(message), str(info.value)
    # the same settings fail in the sampler itself, which is what the check spares every entry point
    model = tiny_model("DFM-SiT-S/2").eval()
    noise = [torch.randn(1, *shape) for shape in model.stage_shapes]
    with pytest.raises(ValueError, match="last noisy time"):
        sample(model, noise, torch.tensor([1]), num_steps_per_scale=[3, 3], thresholds=[0.1],
               method={"name": "sde", "last_noisy_time": 0.2})


def _dfm_checkpoint(tmp_path):
    model = randomize_(tiny_model("DFM-SiT-S/2", in_channels=3, num_classes=2))
    path = tmp_path / "dfm.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "arch": model.arch,
                "config": {"vae": "none", "path_type": "linear"}}, path)
    return str(path)


def test_generate_refuses_a_late_sde_before_writing_anything(tmp_path, capsys):
    import generate

    samples = tmp_path / "samples"
    argv = ["--ckpt", _dfm_checkpoint(tmp_path), "num_samples=2", "num_steps_per_scale=[3,3]",
            f"sample_dir={samples}", f"method={LATE_SDE}"]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("generate.py: error: config key 'method': method sde(last_noisy_time=0.2) cannot sample "
                   "num_steps_per_scale=[3, 3] with thresholds=[0.1]: thresholds must stay above the SDE's last noisy "
                   "time 0.2, got [0.1]")
    assert not samples.exists()  # no run folder, no provenance record
    assert generate.main(argv[:-1] + ["method={name: sde, last_noisy_time: 0.05}"]) == 0


def test_the_budget_sweep_refuses_a_late_sde_before_writing_anything(tmp_path, capsys):
    from generation import budget_sweep

    model = randomize_(tiny_model("DFM-ELIT-SiT-S/2", in_channels=3, num_classes=2, depth=3, encoder_depth=1,
                                  elit_tail_depth=1, group_size=2))
    ckpt = tmp_path / "elit.pt"
    torch.save({"ema": model.state_dict(), "arch": model.arch, "config": {"vae": "none"}}, ckpt)
    out = tmp_path / "sweep"
    assert budget_sweep.main(["--ckpt", str(ckpt), "--class-label", "1", "--out", str(out), "--steps", "3,3",
                              "--method", LATE_SDE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("budget_sweep: error: config key 'method': method sde(last_noisy_time=0.2) cannot sample")
    assert "\n" not in err and not out.exists()


@pytest.mark.parametrize("group", ["preview", "eval_sampler"])
def test_training_checks_the_preview_and_evaluation_samplers_the_same_way(tiny_data, tmp_path, group):
    from training.config import ConfigError

    from train_helpers import tiny_config

    with pytest.raises(ConfigError) as info:
        tiny_config(tiny_data, str(tmp_path), **{f"{group}.method": LATE_SDE, f"{group}.num_steps_per_scale": "[3,3]"})
    assert str(info.value) == (f"{group}.method sde(last_noisy_time=0.2) cannot sample num_steps_per_scale=[3, 3] with "
                               "thresholds=[0.1]: thresholds must stay above the SDE's last noisy time 0.2, got [0.1]")

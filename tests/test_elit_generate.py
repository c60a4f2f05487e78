"""generate.py with ELIT checkpoints: the budget keys (inference_budget, unconditional_inference_budget,
autoguidance), their checks before any image is written, run names and run-folder protection."""
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from generation.config import GenerateConfig, GenerationError, default_run_name, validate_config
from generation.runner import run
from utils.config import load_config


def _tiny_elit(name="ELIT-SiT-S/2", seed=0):
    """Pixel space, 8x8x3 (a 4x4 token grid in 2x2 windows), 4 classes, budgets 1/4 .. 4/4."""
    from models import create_model

    model = create_model(name, depth=3, hidden_size=64, num_heads=4, input_size=8, in_channels=3, num_classes=4,
                         encoder_depth=1, elit_tail_depth=1, group_size=2, elit_max_mask_prob=0.75)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the zero-initialised heads and Write would hide the latents
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = _tiny_elit()
    path = tmp_path_factory.mktemp("ckpt") / "0000100.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "arch": model.arch, "steps": 100,
                "config": {"model": model.arch["name"], "vae": "none", "path_type": "linear"}}, path)
    return str(path)


def _run(ckpt, out, **kw):
    opts = dict(num_samples=4, per_proc_batch_size=4, num_steps_per_scale="[3]", labels="balanced",
                sample_dir=str(out))
    opts.update(kw)
    return run(load_config(GenerateConfig, ["--ckpt", ckpt] + [f"{k}={v}" for k, v in opts.items()]))


def _images(summary):
    return np.stack([np.asarray(Image.open(p)) for p in sorted(Path(summary["run_dir"]).glob("*.png"))])


def test_budget_keys_are_checked_and_named():
    cfg = OmegaConf.structured(GenerateConfig)
    cfg.ckpt = "x.pt"
    for key, value, match in [("inference_budget", -1.0, "inference_budget"),
                              ("unconditional_inference_budget", 0.0, "unconditional_inference_budget"),
                              ("autoguidance", True, "autoguidance")]:
        bad = cfg.copy()
        bad[key] = value
        with pytest.raises(GenerationError, match=match):
            validate_config(bad)


def test_run_name_names_the_budgets():
    cfg = OmegaConf.structured(GenerateConfig)
    cfg.update(ckpt="exps/e/checkpoints/0400000.pt", num_steps_per_scale=[50], thresholds=[], path_type="linear",
               vae="ft-ema", cfg_scale=4.0)
    assert "-b" not in default_run_name(cfg)
    cfg.update(inference_budget=0.25)
    assert "-cfg4-b0.25-ft-ema" in default_run_name(cfg)
    cfg.update(inference_budget=1.0, unconditional_inference_budget=0.0625)
    assert "-cfg4-b1-ub0.0625-" in default_run_name(cfg)
    cfg.update(autoguidance=True)
    assert "-cfg4-b1-ag0.0625-" in default_run_name(cfg)


def test_generate_samples_at_a_budget_and_refuses_bad_or_mixed_budgets(ckpt, tmp_path):
    # a multi-budget model without a budget: one message, nothing written
    with pytest.raises(GenerationError, match="pass inference_budget"):
        _run(ckpt, tmp_path, run_name="none")
    with pytest.raises(GenerationError, match="inference_budget 0.1 keeps no latent"):
        _run(ckpt, tmp_path, run_name="low", inference_budget=0.1)
    with pytest.raises(GenerationError, match="unconditional_inference_budget"):
        _run(ckpt, tmp_path, run_name="ub", inference_budget=1.0, cfg_scale=2.0, unconditional_inference_budget=3)
    assert not any(tmp_path.iterdir())

    quarter = _run(ckpt, tmp_path, run_name="q", inference_budget=0.25)
    full = _run(ckpt, tmp_path, run_name="f", inference_budget=1.0)
    count = _run(ckpt, tmp_path, run_name="c", inference_budget=4)  # 4 latents = 1 per window = 25 %
    assert quarter["generated"] == full["generated"] == 4
    assert not np.array_equal(_images(quarter), _images(full))
    assert np.array_equal(_images(quarter), _images(count))
    saved = OmegaConf.load(Path(quarter["run_dir"]) / "config.yaml")
    assert saved.inference_budget == 0.25 and saved.autoguidance is False
    with pytest.raises(GenerationError, match="inference_budget: 0.25 \\(folder\\) vs 0.5 \\(now\\)"):
        _run(ckpt, tmp_path, run_name="q", inference_budget=0.5)

    # cheap CFG with the unconditional budget equal to the conditional one is plain CFG
    plain = _run(ckpt, tmp_path, run_name="cfg", inference_budget=0.5, cfg_scale=3.0)
    cheap = _run(ckpt, tmp_path, run_name="ccfg", inference_budget=0.5, cfg_scale=3.0,
                 unconditional_inference_budget=0.5)
    low = _run(ckpt, tmp_path, run_name="ccfg-low", inference_budget=0.5, cfg_scale=3.0,
               unconditional_inference_budget=0.25)
    auto = _run(ckpt, tmp_path, run_name="ag", inference_budget=0.5, cfg_scale=3.0,
                unconditional_inference_budget=0.25, autoguidance=True)
    assert np.abs(_images(plain).astype(int) - _images(cheap)).max() <= 1
    assert not np.array_equal(_images(plain), _images(low))
    assert not np.array_equal(_images(low), _images(auto))


def test_budget_keys_on_a_model_without_budgets_are_refused(tmp_path):
    from models import create_model

    model = create_model("SiT-S/2", depth=2, hidden_size=64, num_heads=4, input_size=8, in_channels=3,
                         num_classes=4)
    path = tmp_path / "sit.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "arch": model.arch, "steps": 1,
                "config": {"vae": "none"}}, path)
    with pytest.raises(GenerationError, match="no compute budget"):
        _run(str(path), tmp_path / "out", run_name="x", inference_budget=0.5)

"""Metrics during training (`eval_every`): bit-identical weights, metrics.jsonl + convergence.png,
determinism per sample index, and the bad-input errors at start."""
import json
import os

import numpy as np
import pytest
import torch

from evaluation.compare import read_metrics
from evaluation.swd import swd
from training.config import ConfigError
from training.loop import train

from train_helpers import assert_same_weights, load_ckpt, read_losses, swd_reference, tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


EVAL = {"eval_every": 2, "eval_num_samples": 6, "eval_metrics": "[swd]", "eval_sampler.num_steps_per_scale": "[2,2]",
        "eval_sampler.batch_size": 4}


def test_eval_keeps_weights_bit_identical_and_writes_metrics(tiny_data, tmp_path):
    ref, ref_images = swd_reference(tmp_path / "ref.npz")
    out = str(tmp_path / "out")
    plain = train(tiny_config(tiny_data, out, exp_name="plain"))
    evald = train(tiny_config(tiny_data, out, exp_name="eval", eval_ref_stats=ref, **EVAL))
    a, b = load_ckpt(plain.last_checkpoint), load_ckpt(evald.last_checkpoint)
    assert_same_weights(a, b)
    assert read_losses(plain.exp_dir) == read_losses(evald.exp_dir)

    records = read_metrics(evald.exp_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    evaluated = [r for r in records if "swd" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    assert all(r["images_seen"] == r["step"] * 8 and "loss" in r for r in records)
    assert all(np.isfinite(r["swd"]) and r["swd"] > 0 for r in evaluated)
    with open(os.path.join(evald.exp_dir, "convergence.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC

    # the logged value is the SWD of the images the sampler makes for indices 0..5 from the EMA weights
    import models
    from training.config import model_kwargs
    from training.evaluator import make_evaluator

    cfg = tiny_config(tiny_data, out, exp_name="eval", eval_ref_stats=ref, **EVAL)
    evaluator = make_evaluator(cfg, exp_dir=evald.exp_dir, device="cpu", rank=0, num_processes=1)

    model = models.create_model(cfg.model, **model_kwargs(cfg, 3, 16))
    model.load_state_dict(b["ema"])
    images = evaluator.generate(model, list(range(6)))
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    assert evaluated[-1]["swd"] == pytest.approx(swd(images, ref_images).mean, rel=1e-6)
    # per index: two processes' shares (0, 2, 4 and 1, 3, 5) are rows of the single-process batch
    assert np.array_equal(evaluator.generate(model, [0, 2, 4]), images[0::2])
    assert np.array_equal(evaluator.generate(model, [5]), images[5:])


def test_eval_bad_input_is_one_config_error_before_training(tiny_data, tmp_path):
    ref, _ = swd_reference(tmp_path / "ref.npz")
    ref8, _ = swd_reference(tmp_path / "ref8.npz", resolution=8)
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError, match="eval_ref_stats is not"):
        tiny_config(tiny_data, out, eval_every=2)
    with pytest.raises(ConfigError, match="eval_metrics"):
        tiny_config(tiny_data, out, eval_every=2, eval_ref_stats=ref, eval_metrics="[swd,no_such_metric]")
    with pytest.raises(ConfigError, match="eval_metrics: pr cannot be computed during training"):
        tiny_config(tiny_data, out, eval_every=2, eval_ref_stats=ref, eval_metrics="[swd,pr]")
    with pytest.raises(ConfigError, match="no such file"):
        tiny_config(tiny_data, out, eval_every=2, eval_ref_stats=str(tmp_path / "missing.npz"))
    with pytest.raises(ConfigError, match="eval_sampler.num_steps_per_scale"):
        tiny_config(tiny_data, out, eval_every=2, eval_ref_stats=ref, **{"eval_sampler.num_steps_per_scale": "[3]"})
    cases = {"res": ({"eval_ref_stats": ref8, "eval_metrics": "[swd]"}, "8x8 images"),
             "fid": ({"eval_ref_stats": ref, "eval_metrics": "[fid]",
                      "eval_inception_weights": str(tmp_path / "no_inception.pth")}, "no such file"),
             "fdd": ({"eval_ref_stats": ref, "eval_metrics": "[fdd]",
                      "eval_dinov2_weights": str(tmp_path / "no_dinov2.safetensors")}, "no such file"),
             "cannot": ({"eval_ref_stats": ref, "eval_metrics": "[swd,fid]",
                         "eval_inception_weights": ref}, "cannot score")}
    for name, (over, message) in cases.items():
        cfg = tiny_config(tiny_data, out, exp_name=name, eval_every=2, **over)
        with pytest.raises(ConfigError, match=message):
            train(cfg)
        exp = os.path.join(out, name)
        assert not os.path.exists(os.path.join(exp, "checkpoints")) or not os.listdir(os.path.join(exp, "checkpoints"))
        assert not os.path.exists(os.path.join(exp, "metrics.jsonl"))

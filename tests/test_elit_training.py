"""Training ELIT models: the per-micro-batch budget (shared by the ranks of a real 2-process gloo
run, repeated bit for bit across a kill/resume), tiny multi-budget ELIT and pixel-space DFM-ELIT
runs end to end with multi-budget previews, and the config errors of the ELIT keys."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import ConfigError, parse_config
from training.loop import train
from training.rng import shared_generator

from train_helpers import assert_same_weights, load_ckpt, read_losses, run_torchrun, tiny_argv, tiny_config

LEVELS = [0.25, 0.5, 0.75, 1.0]  # group_size 2: k = 1 .. 4 of the 4 latents per window
# a 4x4 token grid (16 px, patch 4) in 2x2 windows; head 1 block, core 1, tail 2 (S default)
ELIT = dict(model="ELIT-SiT-S/4", model_overrides="{depth: 4, hidden_size: 64, num_heads: 4}", encoder_depth=1,
            group_size=2, elit_min_mask_prob=0.0, elit_max_mask_prob=0.75, **{"preview.num_steps_per_scale": "[2]"})


def read_records(exp_dir):
    """{step: metrics record} (the last record of a step wins, as after a resume)."""
    with open(os.path.join(exp_dir, "metrics.jsonl")) as f:
        return {rec["step"]: rec for rec in map(json.loads, f)}


def expected_budget(seed, step, micro_batch):
    """The draw of the rule, computed here: a uniform index into the levels from the shared stream."""
    g = shared_generator(seed, step, micro_batch, "budget")
    return LEVELS[int(torch.randint(len(LEVELS), (1,), generator=g))]


def test_multi_budget_elit_trains_logs_its_budgets_and_resumes_bit_exactly(tiny_data, tmp_path):
    out = str(tmp_path)
    steps = dict(max_train_steps=6, checkpointing_steps=2, **ELIT)
    straight = train(tiny_config(tiny_data, out, exp_name="straight", **steps))
    cut = train(tiny_config(tiny_data, out, exp_name="cut", **steps), stop_after_step=5)
    assert cut.steps == 5
    train(tiny_config(tiny_data, out, exp_name="cut", **steps))  # resume=auto from step 4

    ref = read_records(straight.exp_dir)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    budgets = [ref[s]["budget"] for s in sorted(ref)]
    assert budgets == [expected_budget(3, s - 1, 0) for s in sorted(ref)]  # log step s = optimizer step s-1
    assert len(set(budgets)) > 1  # several levels really trained
    for rec in ref.values():
        k = round(rec["budget"] * 4)
        assert rec["budget_k"] == k and rec["budget_tokens"] == 4 * k and rec["budget_mean"] == rec["budget"]
    resumed = read_records(os.path.join(out, "cut"))
    for s in ref:
        assert {k: v for k, v in resumed[s].items() if k not in ("time", "images_per_sec")} == \
            {k: v for k, v in ref[s].items() if k not in ("time", "images_per_sec")}, s
    a = load_ckpt(os.path.join(out, "cut", "checkpoints", "0000006.pt"))
    b = load_ckpt(straight.last_checkpoint)
    assert_same_weights(a, b)
    assert b["arch"]["elit_max_mask_prob"] == 0.75 and b["arch"]["group_size"] == 2


def test_budget_of_each_accumulation_step_is_its_own_draw(tiny_data, tmp_path, monkeypatch):
    """A = 2: the two micro-batches of a step draw (step, 0) and (step, 1); budget_mean averages them."""
    from training import budget as budget_module

    seen = []
    original = budget_module.BudgetSampler.__call__

    def spy(self, step, micro_batch):
        out = original(self, step, micro_batch)
        seen.append((step, micro_batch, out["inference_budget"]))
        return out

    monkeypatch.setattr(budget_module.BudgetSampler, "__call__", spy)
    run = train(tiny_config(tiny_data, str(tmp_path), exp_name="acc", gradient_accumulation_steps=2,
                            max_train_steps=3, checkpointing_steps=3, **ELIT))
    assert seen == [(s, a, expected_budget(3, s, a)) for s in range(3) for a in range(2)]
    records = read_records(run.exp_dir)
    for s in range(3):
        assert records[s + 1]["budget"] == seen[2 * s + 1][2]
        assert records[s + 1]["budget_mean"] == pytest.approx((seen[2 * s][2] + seen[2 * s + 1][2]) / 2)


def test_two_gloo_processes_train_every_micro_batch_at_the_same_budget(tiny_data, tmp_path, monkeypatch):
    """2 processes x 1 micro-batch: both ranks must use the level of (step, 0). The 1-process run
    with 2 accumulation steps sees the same data; forcing its second micro-batch onto the level
    of (step, 0) as well must reproduce the 2-process weights, and leaving it at its own draw not."""
    out = str(tmp_path / "runs")
    common = dict(max_train_steps=3, checkpointing_steps=3, **ELIT)
    proc = run_torchrun(tiny_argv(tiny_data, out, exp_name="two", gradient_accumulation_steps=1, **common))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "global batch 8 = 2 x 1 x 4" in open(os.path.join(out, "two", "log.txt")).read()
    two = load_ckpt(os.path.join(out, "two", "checkpoints", "0000003.pt"))
    two_budgets = {s: r["budget"] for s, r in read_records(os.path.join(out, "two")).items()}
    assert two_budgets == {s: expected_budget(3, s - 1, 0) for s in (1, 2, 3)}

    own = load_ckpt(train(tiny_config(tiny_data, out, exp_name="own", gradient_accumulation_steps=2,
                                      **common)).last_checkpoint)
    from training import budget as budget_module

    original = budget_module.BudgetSampler.__call__
    monkeypatch.setattr(budget_module.BudgetSampler, "__call__", lambda self, step, a: original(self, step, 0))
    shared = load_ckpt(train(tiny_config(tiny_data, out, exp_name="shared", gradient_accumulation_steps=2,
                                         **common)).last_checkpoint)
    for key, value in shared["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    differs = [expected_budget(3, s, 1) != expected_budget(3, s, 0) for s in range(3)]
    assert any(differs)  # the seeds draw different levels for the second micro-batch somewhere
    gap = max((own["model"][k] - two["model"][k]).abs().max().item() for k in own["model"])
    assert gap > 1e-4


def test_pixel_dfm_elit_trains_and_previews_three_budgets(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, str(tmp_path), exp_name="dfm-elit", max_train_steps=3, checkpointing_steps=3,
                      sampling_steps=0, **{**ELIT, "model": "DFM-ELIT-SiT-S/4", "preview.num_steps_per_scale": "[2, 2]"},
                      **{"preview.num_samples": 4, "preview.nrow": 2})
    assert list(cfg.preview.budgets) == [0.25, 0.5, 1.0]  # smallest, middle, largest level
    run = train(cfg)
    assert run.steps == 3 and run.last_preview.endswith("0000003.png")
    losses = read_losses(run.exp_dir)
    assert len(losses) == 3 and all(np.isfinite(v) for v in losses.values())
    ckpt = load_ckpt(run.last_checkpoint)
    assert ckpt["arch"]["name"] == "DFM-ELIT-SiT-S/4" and ckpt["arch"]["stages"] == 2
    assert "input_token_editor.adapters.0.learned_query_embed" in ckpt["model"]
    image = np.asarray(Image.open(run.last_preview))
    panel = 2 * (16 + 2) + 2  # a 2x2 grid of 16 px images with 2 px padding
    band = image.shape[0] - (3 + panel)  # the caption band above: budget, latents, FLOPs of each column
    assert band > 20 and image.shape[1:] == (3 * panel + 2 * 8, 3)  # 3 grids under their budget bars, 2 gaps
    assert (image[:band] == 255).mean() > 0.5 and (image[:band] < 128).any()  # white band, dark text
    image = image[band:]
    bars = image[:3, :, 1]
    for i, fraction in enumerate([0.25, 0.5, 1.0]):
        filled = (bars[1, i * (panel + 8):i * (panel + 8) + panel] == 200).sum()
        assert filled == round(fraction * panel)


def test_preview_captions_name_each_budget_and_its_counted_flops(tmp_path):
    import models
    from bench.flops import counted_forward_flops
    from training.setup import make_previewer

    cfg = tiny_config(str(tmp_path), str(tmp_path), **{**ELIT, "model": "DFM-ELIT-SiT-S/4",
                                                       "preview.num_steps_per_scale": "[2, 2]", "preview.num_samples": 4})
    model = models.create_model("DFM-ELIT-SiT-S/4", input_size=16, in_channels=3, num_classes=2, depth=4,
                                hidden_size=64, num_heads=4, encoder_depth=1, group_size=2, elit_min_mask_prob=0.0,
                                elit_max_mask_prob=0.75)
    maker = make_previewer(cfg, model, str(tmp_path), "cpu", True)
    assert maker.budget_flops == [counted_forward_flops(model, b) for b in (0.25, 0.5, 1.0)]
    assert maker.budget_flops[0] < maker.budget_flops[1] < maker.budget_flops[2]
    grids = [np.zeros((10, 20, 3), np.uint8)] * 3
    from training.previews import side_by_side

    saved = maker._captioned(side_by_side(grids), grids)
    assert saved.shape[1] == 3 * 20 + 2 * 8 and saved.shape[0] > 10  # upscale 1 + the band
    assert maker._captioned(side_by_side(grids[:1]), grids[:1]).shape[0] == saved.shape[0]


def test_single_budget_elit_gets_its_one_budget(tiny_data, tmp_path):
    single = {**ELIT, "elit_max_mask_prob": 0.5, "elit_min_mask_prob": "null"}  # min = max: one budget
    cfg = tiny_config(tiny_data, str(tmp_path), exp_name="single", max_train_steps=2, checkpointing_steps=2,
                      **single)
    assert cfg.elit_min_mask_prob == 0.5 and list(cfg.preview.budgets) == [0.5]
    run = train(cfg)
    assert [r["budget"] for r in read_records(run.exp_dir).values()] == [0.5, 0.5]


def test_non_elit_runs_log_no_budget(tiny_data, tmp_path):
    run = train(tiny_config(tiny_data, str(tmp_path), exp_name="plain", max_train_steps=1, checkpointing_steps=1))
    assert not any(k.startswith("budget") for k in read_records(run.exp_dir)[1])


@pytest.mark.parametrize("overrides,message", [
    (dict(model="SiT-S/4", group_size=2), "group_size=2 is an ELIT key, but SiT-S/4 is not an ELIT model"),
    (dict(model="SiT-S/4", group_size=8), "remove it, or train ELIT-SiT-S/4"),
    (dict(elit_max_mask_prob=0.5), "elit_max_mask_prob=0.5 is an ELIT key, but DFM-SiT-S/4"),
    (dict(elit_min_mask_prob=0.0), "DFM-ELIT-SiT-S/4"),
    (dict(**{**ELIT, "group_size": 3}), "group_size=3 must divide the 4x4 token grid"),
    (dict(**{**ELIT, "elit_min_mask_prob": 0.75, "elit_max_mask_prob": 0.5}),
     "elit_min_mask_prob (0.75) must be <= elit_max_mask_prob (0.5)"),
    (dict(**{**ELIT, "elit_max_mask_prob": 1.0}), "must lie in [0, 1)"),
    (dict(**{**ELIT, "preview.budgets": "[0.1]"}), "preview.budgets: inference_budget 0.1 keeps no latent"),
    (dict(**{**ELIT, "preview.budgets": "[5]"}), "preview.budgets: inference_budget 5.0 > 1 is a latent count"),
    (dict(**{"preview.budgets": "[1.0]"}), "preview.budgets is for ELIT models only"),
    (dict(model="ELIT-SiT-Q/2"), "ELIT-SiT-XL/2"),
])
def test_bad_elit_keys_are_one_config_error_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        parse_config(tiny_argv(str(tmp_path), str(tmp_path), **overrides))
    assert message in str(error.value)


def test_elit_defaults_and_experiment_names():
    base = ["data_dir=/x", "model=ELIT-SiT-XL/2"]
    cfg = parse_config(base)
    assert (cfg.group_size, cfg.elit_min_mask_prob, cfg.elit_max_mask_prob) == (4, 0.0, 0.0)  # grid 16 / 4
    assert cfg.exp_name == "elit-sit-xl-2-256-lognormal" and list(cfg.preview.budgets) == [1.0]
    cfg = parse_config(base + ["resolution=512", "elit_min_mask_prob=0", "elit_max_mask_prob=0.984375"])
    assert cfg.group_size == 8 and cfg.exp_name == "elit-sit-xl-2-512-lognormal-mask0-0.984375"
    assert list(cfg.preview.budgets) == [1 / 64, 32 / 64, 1.0]
    cfg = parse_config(base + ["elit_group_size=2"])  # the reference's name
    assert cfg.group_size == 2

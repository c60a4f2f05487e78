"""A real 2-process CPU run (torchrun + gloo) agrees with the 1-process run of the same
global batch: 2 processes x 1 micro-batch == 1 process x 2 accumulation steps; the evaluation
(`eval_every`, each process samples its share) gives the same SWD."""
import os
import re

import pytest
import torch

from evaluation.compare import read_metrics
from training.demo_data import write_demo_dataset
from training.loop import train

from train_helpers import load_ckpt, read_losses, run_torchrun, swd_reference, tiny_argv, tiny_config


def test_two_process_gloo_run_matches_one_process(tmp_path):
    data = write_demo_dataset(str(tmp_path / "data"), resolution=16, num_classes=2, images_per_class=10)
    out = str(tmp_path / "runs")
    ref, _ = swd_reference(tmp_path / "ref.npz")
    common = {"max_train_steps": 3, "checkpointing_steps": 3, "cpu_threads": 1, "eval_every": 3, "eval_ref_stats": ref,
              "eval_num_samples": 7, "eval_metrics": "[swd]", "eval_sampler.num_steps_per_scale": "[2,2]"}
    proc = run_torchrun(tiny_argv(data, out, exp_name="two", gradient_accumulation_steps=1, **common), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    one = train(tiny_config(data, out, exp_name="one", gradient_accumulation_steps=2, **common))

    log = open(os.path.join(out, "two", "log.txt")).read()
    assert re.search(r"2 process\(es\) on cpu \(\d+ CPU threads each\), global batch 8 = 2 x 1 x 4", log)  # really distributed
    two_ckpt = load_ckpt(os.path.join(out, "two", "checkpoints", "0000003.pt"))
    one_ckpt = load_ckpt(one.last_checkpoint)
    assert len(two_ckpt["rng"]) == 2 and not torch.equal(two_ckpt["rng"][0]["torch"], two_ckpt["rng"][1]["torch"])
    assert two_ckpt["data_position"] == one_ckpt["data_position"]
    # Same data, same per-micro-batch random draws: only the float summation order differs.
    l1, l2 = read_losses(one.exp_dir), read_losses(os.path.join(out, "two"))
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-5, abs=1e-6)
    for key, value in one_ckpt["model"].items():
        torch.testing.assert_close(two_ckpt["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    (e1,), (e2,) = ([r for r in read_metrics(d) if "swd" in r] for d in (one.exp_dir, os.path.join(out, "two")))
    assert e1["step"] == e2["step"] == 3 and e2["swd"] == pytest.approx(e1["swd"], rel=0.02)
    moved = max((one_ckpt["model"][k] - one_ckpt["ema"][k]).abs().max().item() for k in one_ckpt["model"])
    assert moved > 0

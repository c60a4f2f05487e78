"""Shared pieces of the training tests: a tiny pixel-space dataset and config."""
import json
import os
import subprocess
import sys

import torch

from training.config import parse_config

TINY_MODEL = ["model=DFM-SiT-S/4", "model_overrides={depth: 2, hidden_size: 64, num_heads: 4}"]


def tiny_argv(data_dir, output_dir, **overrides):
    """argv for a 16-px, 2-class, tiny DFM-SiT run (a few ms per step)."""
    argv = TINY_MODEL + [
        f"data_dir={data_dir}", f"output_dir={output_dir}", "vae=none", "resolution=16", "num_classes=2",
        "batch_size=8", "num_workers=0", "mixed_precision=no", "lr=1e-3", "ema_decay=0.9",
        "max_train_steps=4", "checkpointing_steps=2", "log_every=1", "sampling_steps=0", "report_to=none",
        "resume=auto", "preview.num_samples=0", "preview.num_steps_per_scale=[2,2]", "seed=3", "cpu_threads=1",
    ]
    argv += [f"{k}={v}" for k, v in overrides.items()]
    return argv


def tiny_config(data_dir, output_dir, **overrides):
    return parse_config(tiny_argv(data_dir, output_dir, **overrides))


def read_losses(exp_dir):
    """{step: loss} from metrics.jsonl (the last record of a step wins, as after a resume; evaluation
    records, which carry no loss, are skipped)."""
    losses = {}
    with open(os.path.join(exp_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                losses[rec["step"]] = rec["loss"]
    return losses


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_torchrun(argv, nproc=2, timeout=240):
    """`torchrun --standalone --nproc_per_node nproc train.py argv` on CPU (gloo), offline; the finished process."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", PYTHONPATH=repo)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           *argv]
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def swd_reference(path, resolution=16, count=12, seed=1):
    """A statistics file holding only `count` random uint8 `swd_images`; returns (path, images)."""
    import numpy as np

    from evaluation.stats_file import ReferenceStatistics, save_statistics

    images = np.random.default_rng(seed).integers(0, 256, (count, resolution, resolution, 3), dtype=np.uint8)
    meta = {"num_images": count, "resolution": [resolution] * 2, "inception": None, "dinov2": None,
            "swd": {"num_images": count, "seed": 0}}
    save_statistics(ReferenceStatistics({"swd_images": images}, meta), str(path))
    return str(path), images


def assert_same_weights(a: dict, b: dict, parts=("model", "ema")) -> None:
    """Two training checkpoints hold bit-identical weights (same keys, torch.equal tensors)."""
    for part in parts:
        assert a[part].keys() == b[part].keys(), part
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)

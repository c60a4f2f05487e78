"""End to end: raw class folders -> convert -> encode (tiny VAE) -> a few training steps.

Skips cleanly while the trainer (training/loop.py, training/config.py) is not there yet.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def _raw_tree(root):
    rng = np.random.default_rng(0)
    for k in range(3):
        os.makedirs(os.path.join(root, f"class{k}"))
        for i in range(3):
            arr = rng.integers(0, 256, (40 + 4 * i, 52, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(root, f"class{k}", f"im{i}.jpg"))
    with open(os.path.join(root, "class1", "broken.jpg"), "wb") as f:
        f.write(b"not an image")


@pytest.mark.parametrize("fmt", ["per-image", "packed"])
def test_convert_encode_train(tmp_path, fmt):
    loop = pytest.importorskip("training.loop")
    config = pytest.importorskip("training.config")
    if not (hasattr(loop, "train") and hasattr(config, "parse_config")):
        pytest.skip("the trainer does not expose training.loop.train / training.config.parse_config yet")
    from conftest import save_tiny_vae

    from data.convert import convert_dataset
    from data.encode import encode_dataset

    raw, images, latents, vae_dir = (str(tmp_path / n) for n in ("raw", "images", "vae-sd", "tiny-vae"))
    _raw_tree(raw)
    summary = convert_dataset(raw, images, resolution=(32, 32), workers=1, progress=False)
    assert summary["num_images"] == 9 and len(summary["skipped"]) == 1
    save_tiny_vae(vae_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encode_dataset(images, latents, vae=vae_dir, fmt=fmt, batch_size=4, shard_size=4, progress=False,
                       device="cpu")
        yaml_path = tmp_path / "run.yaml"  # a YAML file, as users write them ("no" must be quoted there)
        yaml_path.write_text(
            'model: DFM-SiT-S/2\nstages: 2\nmodel_overrides: {depth: 1, hidden_size: 32, num_heads: 2}\n'
            f'data_dir: "{tmp_path}"\nvae: "{vae_dir}"\nresolution: 32\nnum_classes: 3\nbatch_size: 4\n'
            'num_workers: 0\nmixed_precision: "no"\nmax_train_steps: 2\ncheckpointing_steps: 1000\n'
            f'log_every: 1\npreview: {{num_samples: 0}}\noutput_dir: "{tmp_path / "exps"}"\nexp_name: e2e\n'
            'report_to: none\nresume: none\n'
        )
        cfg = config.parse_config(["--config", str(yaml_path)])
        result = loop.train(cfg, stop_after_step=2)
    finally:
        torch.set_num_threads(threads)
    assert result.steps == 2
    metrics = os.path.join(result.exp_dir, "metrics.jsonl")
    if os.path.exists(metrics):  # the trainer's per-log-step metrics, when it writes them
        with open(metrics) as f:
            losses = [json.loads(line)["loss"] for line in f if line.strip()]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)

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


def check_whole_pipeline(tiny_data, tmp_path, keys: dict, methods=("euler",), eval_swd: bool = True,
                         generate_args=((),)) -> dict:
    """An idea run end to end as a researcher would: train 4 steps; train again, killed after step 3,
    and resume: the same weights and losses bit for bit; (with `eval_swd`) evaluation during training;
    export .safetensors; sample with generate.py from the .pt and the .safetensors with every sampler
    method in `methods`: the same images from both, finite and not all equal. Returns
    {"straight": TrainResult, "ckpt": the last checkpoint dict, "exported": path, "images": {(method, *args): arr}}
    (`generate_args`: extra generate.py arguments, one sampling per entry)."""
    import os

    import numpy as np

    from generation.config import load_generate_config
    from generation.runner import run as generate
    from models import load_pretrained
    from training.loop import train

    keys = dict(keys, max_train_steps=4, checkpointing_steps=2, save_format="safetensors")
    if eval_swd:
        ref, _ = swd_reference(tmp_path / "ref.npz", resolution=16, count=8)
        keys.update(eval_every=4, eval_num_samples=4, eval_metrics="[swd]", eval_ref_stats=ref)  # the preview's sampler
    out = str(tmp_path)
    straight = train(tiny_config(tiny_data, out, exp_name="straight", **keys))
    train(tiny_config(tiny_data, out, exp_name="cut", **keys), stop_after_step=3)  # killed after step 3
    resumed = train(tiny_config(tiny_data, out, exp_name="cut", **keys))  # resumes from step 2
    assert resumed.steps == 4
    ckpt = load_ckpt(straight.last_checkpoint)
    assert_same_weights(load_ckpt(resumed.last_checkpoint), ckpt)
    assert read_losses(resumed.exp_dir) == read_losses(straight.exp_dir)
    if eval_swd:
        swd = [json.loads(line) for line in open(os.path.join(straight.exp_dir, "metrics.jsonl")) if "swd" in line]
        assert len(swd) == 1 and swd[0]["swd"] == swd[0]["swd"]  # evaluated during training, not NaN
    exported = os.path.join(straight.exp_dir, "weights", "0000004.safetensors")
    model = load_pretrained(exported)  # the exported weights rebuild the same model with no flag
    for key, value in ckpt["ema"].items():
        assert torch.equal(model.state_dict()[key], value), key
    steps = "[3,3]" if ckpt["arch"].get("stages", 1) == 2 else "[6]"
    images = {}
    for method in methods:
        for extra in generate_args:  # e.g. one argv per ELIT budget
            runs = []
            for source in (straight.last_checkpoint, exported):
                name = f"{method}-{len(images)}-{os.path.basename(source)}"
                generate(load_generate_config([f"--ckpt={source}", "num_samples=4", f"num_steps_per_scale={steps}",
                                               f"method={method}", f"sample_dir={tmp_path / 'samples'}",
                                               "save_png=false", f"run_name={name}", "cpu_threads=1", *extra]))
                runs.append(np.load(tmp_path / "samples" / f"{name}.npz")["arr_0"])
            assert runs[0].shape == (4, 16, 16, 3) and np.array_equal(runs[0], runs[1]), (method, extra)
            assert runs[0].std() > 0, (method, extra)  # not a constant (black) image
            images[(method, *extra)] = runs[0]
    return {"straight": straight, "ckpt": ckpt, "exported": exported, "images": images}

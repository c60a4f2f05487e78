"""Pure pieces of generation/: labels, per-sample noise, config checks, PNG / .npz files."""

import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from generation.config import GenerateConfig, GenerationError, default_run_name, resolve_config, validate_config
from generation.images import (is_complete_png, missing_pngs, npz_is_complete, png_path, write_npz_from_pngs,
                               write_png_atomic)
from generation.labels import class_labels
from generation.noise import derive_seed, initial_noise, sde_generators


def test_balanced_labels_exact_counts_and_seeded():
    labels = class_labels(1000, 10, seed=3, mode="balanced")
    assert labels.dtype == torch.long and labels.shape == (1000,)
    assert torch.bincount(labels, minlength=10).tolist() == [100] * 10
    assert torch.equal(labels, class_labels(1000, 10, seed=3, mode="balanced"))
    assert not torch.equal(labels, class_labels(1000, 10, seed=4, mode="balanced"))
    assert not torch.equal(labels, torch.arange(1000) % 10)  # shuffled


def test_balanced_labels_warn_when_not_divisible():
    with pytest.warns(UserWarning, match="not a multiple"):
        counts = torch.bincount(class_labels(25, 10, seed=0, mode="balanced"), minlength=10)
    assert counts.max() - counts.min() == 1 and counts.sum() == 25


def test_random_labels_depend_only_on_seed_and_index():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short, long = class_labels(50, 7, 1, "random"), class_labels(300, 7, 1, "random")
    assert torch.equal(short, long[:50])
    assert set(long.tolist()) == set(range(7))
    assert not torch.equal(long, class_labels(300, 7, 2, "random"))
    with pytest.raises(ValueError, match="labels"):
        class_labels(10, 7, 1, "uniform")


def test_noise_rows_independent_of_batch():
    shapes = [(3, 4, 4), (3, 8, 8)]
    batch = initial_noise(5, [0, 3, 9, 2], shapes)
    assert [tuple(x.shape) for x in batch] == [(4, 3, 4, 4), (4, 3, 8, 8)]
    assert all(x.dtype == torch.float32 for x in batch)
    single = initial_noise(5, [9], shapes)
    for s in range(2):
        assert torch.equal(batch[s][2], single[s][0])
    assert not torch.equal(batch[0][0], batch[0][1])
    assert not torch.equal(initial_noise(6, [9], shapes)[0], single[0])
    # SDE noise is its own stream, and per sample.
    g1, g2 = sde_generators(5, [9, 9])
    assert torch.equal(torch.randn(5, generator=g1), torch.randn(5, generator=g2))
    sde_first = torch.randn(3, 4, 4, generator=sde_generators(5, [9])[0])
    assert not torch.equal(sde_first, single[0][0])
    assert derive_seed(0, 1, "noise") != derive_seed(1, 0, "noise") != derive_seed(0, 1, "sde")


def _cfg(**kw):
    cfg = OmegaConf.structured(GenerateConfig)
    cfg.ckpt = "exps/dfm-b/checkpoints/0400000.pt"
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@pytest.mark.parametrize("key, value, match", [
    ("method", "dpm", "method"), ("labels", "even", "labels"), ("precision", "fp16", "precision"),
    ("num_samples", 0, "num_samples"), ("num_samples", 100_000_001, "num_samples': must be from 1 to 100,000,000"),
    ("per_proc_batch_size", 0, "per_proc_batch_size"),
    ("guidance_low", 1.5, "guidance_low"), ("thresholds", [0.1, 0.3], "thresholds"),
    ("num_steps_per_scale", [40, 0], "num_steps_per_scale"), ("ckpt", None, "ckpt"),
    ("save_npz", False, "save_png/save_npz"), ("run_name", "a/b", "run_name")])
def test_validate_names_the_bad_key(key, value, match):
    cfg = _cfg(save_png=False) if key == "save_npz" else _cfg()
    cfg[key] = value
    with pytest.raises(GenerationError, match=match):
        validate_config(cfg)


def test_resolve_fills_defaults_and_checks_model():
    info = dict(arch_name="DFM-SiT-B/2", num_stages=2, num_classes=1000, input_size=32)
    cfg = resolve_config(_cfg(), ckpt_config={"vae": "stabilityai/sd-vae-ft-mse", "path_type": "linear"}, **info)
    assert list(cfg.num_steps_per_scale) == [40, 10] and list(cfg.thresholds) == [0.1]
    assert cfg.resolution == 256 and cfg.vae == "stabilityai/sd-vae-ft-mse" and cfg.stages == 2
    assert cfg.run_name == "dfm-b-0400000-euler40+10-th0.1-cfg1-ft-mse-random-seed0-n50000"  # tf32: the default
    assert default_run_name(cfg, legacy=True) == cfg.run_name + "-tf32"
    cfg.precision = "bf16"
    assert default_run_name(cfg).endswith("-n50000-bf16")
    sit = resolve_config(_cfg(), ckpt_config=None, arch_name="SiT-XL/2", num_stages=1, num_classes=1000,
                         input_size=64)
    assert list(sit.num_steps_per_scale) == [50] and list(sit.thresholds) == [] and sit.resolution == 512
    assert sit.vae == "ft-ema"
    for bad, match in [({"num_steps_per_scale": [50]}, "num_steps_per_scale"), ({"stages": 3}, "stages"),
                       ({"thresholds": [0.2, 0.1]}, "thresholds"), ({"resolution": 512}, "resolution"),
                       ({"num_classes": 10}, "num_classes")]:
        with pytest.raises(GenerationError, match=match):
            resolve_config(_cfg(**bad), ckpt_config=None, **info)
    pixel = resolve_config(_cfg(vae="none", cfg_scale=1.8, guidance_high=0.7), ckpt_config=None, **info)
    assert pixel.resolution == 32 and "cfg1.8-g0-0.7" in default_run_name(pixel)


def test_png_check_and_npz_stream(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        write_png_atomic(png_path(tmp_path, i), image)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert all(is_complete_png(png_path(tmp_path, i), 6) for i in range(5))
    assert not is_complete_png(png_path(tmp_path, 0), 8)  # wrong size
    data = png_path(tmp_path, 1).read_bytes()
    png_path(tmp_path, 1).write_bytes(data[: len(data) // 2])  # truncated
    assert not is_complete_png(png_path(tmp_path, 1), 6)
    assert not is_complete_png(png_path(tmp_path, 9), 6)  # missing
    write_png_atomic(png_path(tmp_path, 1), images[1])
    npz = tmp_path / "s.npz"
    write_npz_from_pngs(npz, tmp_path, 5, 6, labels=np.arange(5))
    with np.load(npz) as f:
        assert f["arr_0"].dtype == np.uint8 and np.array_equal(f["arr_0"], images)
        assert np.array_equal(f["arr_1"], np.arange(5))
    assert npz_is_complete(npz, (5, 6, 6, 3)) and not npz_is_complete(npz, (4, 6, 6, 3))
    assert not npz_is_complete(tmp_path / "none.npz", (5, 6, 6, 3))


def _damaged_pngs(good: bytes, size: int) -> dict:
    """name -> bytes of a file that must not count as a finished size x size sample."""
    from io import BytesIO

    from PIL import Image

    def encoded(mode, width, height, fmt="PNG"):
        buf = BytesIO()
        Image.new(mode, (width, height)).save(buf, fmt)
        return buf.getvalue()

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    return {
        "zero bytes": b"",
        "garbage": bytes(range(256)) * 4,
        "truncated": good[:-13],
        "truncated header": good[:30],
        "no IEND": good[:-12],
        "bytes after IEND": good + b"\0",
        "one bit flipped in IDAT": bytes(flipped),
        "wrong size": encoded("RGB", size + 1, size),
        "RGBA": encoded("RGBA", size, size),
        "grey": encoded("L", size, size),
        "16-bit": encoded("I;16", size, size),
        "JPEG": encoded("RGB", size, size, "JPEG"),
    }


def test_resume_check_finds_every_damaged_png(tmp_path):
    """A file under its final name counts as finished only if it is intact (the decoder, which the
    check replaced, reads some of these without complaint: a cut CRC, a flipped bit in IDAT)."""
    size = 6
    images = np.random.default_rng(1).integers(0, 256, size=(3, size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        write_png_atomic(png_path(tmp_path, i), image)
    good = png_path(tmp_path, 0).read_bytes()
    damaged = _damaged_pngs(good, size)
    for k, (what, payload) in enumerate(damaged.items()):
        path = png_path(tmp_path, 10 + k)
        path.write_bytes(payload)
        assert not is_complete_png(path, size), what
    assert all(is_complete_png(png_path(tmp_path, i), size) for i in range(3))
    indices = range(10 + len(damaged) + 2)
    expected = [i for i in indices if not is_complete_png(png_path(tmp_path, i), size)]
    assert expected == [i for i in indices if i >= 3]  # the gaps 3..9 and the damaged ones
    assert missing_pngs(tmp_path, indices, size, threads=3) == expected == missing_pngs(tmp_path, indices, size)
    write_png_atomic(png_path(tmp_path, 700), images[2])  # past the first blocks of 256
    assert missing_pngs(tmp_path, range(1000), size) == [i for i in range(1000) if i not in (0, 1, 2, 700)]


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "generation").glob("*.yaml")), ids=lambda p: p.name)
def test_generation_configs_load_and_resolve(path):
    from utils.config import load_config
    cfg = load_config(GenerateConfig, ["--config", str(path), "--ckpt", "x.pt"])
    validate_config(cfg)
    dfm = path.name.startswith("dfm")
    size = 64 if "_512" in path.name else 32
    resolved = resolve_config(cfg, arch_name=cfg.model, num_stages=2 if dfm else 1, num_classes=1000,
                              input_size=size, ckpt_config={"vae": "ft-ema"})
    assert resolved.resolution == size * 8 and resolved.num_samples == 50_000
    if dfm:
        assert list(resolved.num_steps_per_scale) == [40, 10] and list(resolved.thresholds) == [0.1]
    with pytest.raises(GenerationError, match="resolution"):  # a config refuses the other resolution
        resolve_config(cfg, arch_name=cfg.model, num_stages=2 if dfm else 1, num_classes=1000,
                       input_size=96, ckpt_config=None)


def test_evaluation_script_stops_with_clear_messages(tmp_path):
    import subprocess
    script = ROOT / "experiments" / "evaluation" / "eval_dfm_sit_b_256.sh"
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"x")

    def stderr(**env):
        base = {"PATH": __import__("os").environ["PATH"], "HOME": str(tmp_path)}
        proc = subprocess.run(["bash", str(script)], env={**base, **env}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2
        return proc.stderr

    assert "checkpoint not found" in stderr()
    assert "REF_BATCH is not set" in stderr(CKPT=str(ckpt))
    assert "reference batch not found" in stderr(CKPT=str(ckpt), REF_BATCH="nope.npz")
    assert "INCEPTION_WEIGHTS is not set" in stderr(CKPT=str(ckpt), REF_BATCH=str(ref))
    assert "Inception weights not found" in stderr(CKPT=str(ckpt), REF_BATCH=str(ref), INCEPTION_WEIGHTS="w.pth")


@pytest.mark.parametrize("path, tag", [
    ("exps/sit-b-2-256px/checkpoints/0400000.pt", "sit-b-2-256px-0400000"),
    ("exps/run-a/weights/0000004.safetensors", "run-a-0000004"),
    ("exps/run-a/posthoc_ema/reconstructed/0000010-std0.08.safetensors", "run-a-0000010-std0.08"),
    ("pretrained/repa-sit-xl-2-256-4m.pt", "repa-sit-xl-2-256-4m"),
])
def test_checkpoint_tags_name_the_run_of_every_weights_file(path, tag):
    from generation.config import checkpoint_tag

    assert checkpoint_tag(path) == tag  # two runs' reconstructions (or exports) never share a sample folder


def test_evaluation_script_names_runs_after_the_checkpoint_first(tmp_path):
    """eval_*.sh name a run EXPERIMENT-STEP-CONFIG (the checkpoint's own name first, as generate.py
    names it), so one sampler config evaluated on two models gives two names."""
    import os
    import subprocess
    import sys

    shim = tmp_path / "python"  # the real interpreter, except that the sampling itself only prints its command
    shim.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\necho "RAN $*"; exit 0\n')
    shim.chmod(0o755)
    ref, weights = tmp_path / "ref.npz", tmp_path / "w.pth"
    ref.write_bytes(b"x")
    weights.write_bytes(b"x")
    names = []
    for run in ("run-a", "run-b"):
        ckpt = tmp_path / "exps" / run / "checkpoints" / "0400000.pt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"x")
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": str(shim), "CKPT": str(ckpt),
               "REF_BATCH": str(ref), "INCEPTION_WEIGHTS": str(weights), "SAMPLE_DIR": str(tmp_path / "results")}
        proc = subprocess.run(["bash", str(ROOT / "experiments" / "evaluation" / "eval_dfm_sit_b_256.sh")], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "finished without writing" in proc.stderr  # the shim wrote no .npz
        names.append(next(a.split("=", 1)[1] for a in proc.stdout.split() if a.startswith("run_name=")))
    assert names == ["run-a-0400000-dfm_sit_b_256", "run-b-0400000-dfm_sit_b_256"]

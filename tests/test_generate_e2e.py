"""generate.py end to end on the CPU with tiny models: outputs, determinism over 1 and 2
processes, resume, class balance, the .npz format, and clear errors for bad checkpoints."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import generate
from generation.config import GenerateConfig, GenerationError
from generation.labels import class_labels
from generation.runner import run
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4


def _tiny(name="DFM-SiT-S/2", seed=0, **overrides):
    from models import create_model
    arch = dict(depth=2, hidden_size=64, num_heads=4, input_size=8, in_channels=3, num_classes=NUM_CLASSES)
    arch.update(overrides)
    model = create_model(name, **arch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the zero-initialised heads would make every velocity 0
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _save_checkpoint(path, model, ema, vae="none"):
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "arch": model.arch,
                "config": {"model": model.arch["name"], "vae": vae, "path_type": "linear",
                           "num_classes": model.num_classes, "stages": model.num_stages},
                "steps": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A pixel-space DFM-SiT (S = 2, 8x8x3, 4 classes); `model` and `ema` weights differ."""
    folder = tmp_path_factory.mktemp("ckpt")
    return _save_checkpoint(folder / "0000100.pt", _tiny(seed=1), _tiny(seed=0))


def _argv(ckpt, out, **kw):
    opts = dict(num_samples=8, per_proc_batch_size=5, num_steps_per_scale="[3,2]", labels="balanced",
                run_name="run", sample_dir=str(out))
    opts.update(kw)
    return ["--ckpt", ckpt] + [f"{k}={v}" for k, v in opts.items()]


def _run(ckpt, out, **kw):
    return run(load_config(GenerateConfig, _argv(ckpt, out, **kw)))


def _pngs(run_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(run_dir).glob("*.png"))}


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """One in-process run (SDE, so the per-sample SDE generators are exercised too)."""
    out = tmp_path_factory.mktemp("ref")
    summary = _run(ckpt, out, method="sde")
    return out, summary


def test_outputs_npz_format_and_class_balance(reference):
    out, summary = reference
    assert summary["generated"] == 8 and summary["images_per_second"] > 0
    run_dir = out / "run"
    assert sorted(_pngs(run_dir)) == [f"{i:06d}.png" for i in range(8)]
    with np.load(out / "run.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (8, 8, 8, 3)
    from PIL import Image
    for i in range(8):  # index order
        assert np.array_equal(images[i], np.asarray(Image.open(run_dir / f"{i:06d}.png")))
    assert len({images[i].tobytes() for i in range(8)}) == 8
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [2] * NUM_CLASSES
    assert np.array_equal(labels, class_labels(8, NUM_CLASSES, 0, "balanced").numpy())
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.vae == "none" and saved.resolution == 8 and saved.method == "sde"
    assert list(saved.thresholds) == [0.1] and saved.model == "DFM-SiT-S/2"


def test_two_processes_and_other_batch_size_match_one_process(ckpt, reference, tmp_path):
    ref_out, _ = reference
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "generate.py")] + _argv(ckpt, tmp_path, method="sde", per_proc_batch_size=2)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "images/s" in proc.stdout
    assert _pngs(tmp_path / "run") == _pngs(ref_out / "run")
    with np.load(tmp_path / "run.npz") as a, np.load(ref_out / "run.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_resume_keeps_finished_images_and_makes_missing_ones(ckpt, reference, tmp_path):
    ref_out, _ = reference
    first = _run(ckpt, tmp_path, method="sde", per_proc_batch_size=4)
    assert first["generated"] == 8
    run_dir = tmp_path / "run"
    assert _pngs(run_dir) == _pngs(ref_out / "run")
    (run_dir / "000002.png").unlink()
    (run_dir / "000007.png").unlink()
    truncated = run_dir / "000005.png"
    truncated.write_bytes(truncated.read_bytes()[:40])  # a run killed mid-write (without rename)
    (run_dir / "000000.png").write_bytes(b"")  # a file the disk lost
    flipped = bytearray((run_dir / "000003.png").read_bytes())
    flipped[len(flipped) // 2] ^= 0x10  # damaged inside the image data
    (run_dir / "000003.png").write_bytes(bytes(flipped))
    (run_dir / ".tmp-123-000006.png").write_bytes(b"partial")
    (tmp_path / "run.npz").unlink()
    damaged = {"000000.png", "000003.png", "000005.png"}
    kept = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("0*.png") if p.name not in damaged}
    second = _run(ckpt, tmp_path, method="sde", per_proc_batch_size=3)
    assert second["generated"] == 5
    assert _pngs(run_dir) == _pngs(ref_out / "run")
    assert {n: (run_dir / n).stat().st_mtime_ns for n in kept} == kept  # untouched
    assert not list(run_dir.glob(".tmp-*"))
    with np.load(tmp_path / "run.npz") as a, np.load(ref_out / "run.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    assert _run(ckpt, tmp_path, method="sde")["generated"] == 0  # complete: nothing to do
    with pytest.raises(GenerationError, match="seed"):  # same folder, other settings
        _run(ckpt, tmp_path, method="sde", seed=1)


def test_raw_weights_one_stage_model_and_png_cleanup(ckpt, reference, tmp_path):
    ref_out, _ = reference
    raw = _run(ckpt, tmp_path, method="sde", use_ema="false", run_name="raw")
    assert raw["generated"] == 8
    assert _pngs(tmp_path / "raw") != _pngs(ref_out / "run")
    sit = _save_checkpoint(tmp_path / "sit.pt", _tiny("SiT-S/2"), _tiny("SiT-S/2"))
    summary = _run(sit, tmp_path, method="heun", num_steps_per_scale="[3]", cfg_scale=2.0,
                   guidance_high=0.7, labels="random", save_png="false", run_name="null", num_samples=4,
                   precision="bf16")
    npz = Path(summary["npz"])
    assert npz.name == "sit-heun3-cfg2-g0-0.7-random-seed0-n4-bf16.npz"
    with np.load(npz) as f:
        assert f["arr_0"].shape == (4, 8, 8, 3)
    assert not list(Path(summary["run_dir"]).glob("*.png"))
    assert (Path(summary["run_dir"]) / "config.yaml").is_file()
    three = _save_checkpoint(tmp_path / "s3.pt", _tiny(stages=3), _tiny(stages=3))
    summary = _run(three, tmp_path, num_samples=4, num_steps_per_scale="[2,2,2]", run_name="s3")
    assert list(OmegaConf.load(Path(summary["run_dir"]) / "config.yaml").thresholds) == [0.1, 0.05]
    with np.load(summary["npz"]) as f:
        assert f["arr_0"].shape == (4, 8, 8, 3)


def test_latent_model_decodes_with_a_local_vae(tmp_path):
    from conftest import save_tiny_vae

    save_tiny_vae(tmp_path / "vae")
    model = _tiny(input_size=4, in_channels=4)
    ckpt = _save_checkpoint(tmp_path / "latent.pt", model, model, vae=str(tmp_path / "vae"))
    summary = _run(ckpt, tmp_path, num_samples=4, num_steps_per_scale="[2,2]")
    with np.load(summary["npz"]) as f:
        assert f["arr_0"].shape == (4, 32, 32, 3) and f["arr_0"].dtype == np.uint8


def test_bad_inputs_end_in_one_clear_message(ckpt, tmp_path, capsys):
    def error_of(argv):
        assert generate.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("generate.py: error:") and "Traceback" not in err
        return err

    assert "holds a DFM-SiT-S/2 model, but model=SiT-XL/2" in error_of(
        _argv(ckpt, tmp_path, model="SiT-XL/2"))
    # A published-style checkpoint (weights only) loaded as another architecture.
    raw = tmp_path / "raw.pt"
    torch.save({"ema": _tiny("SiT-S/2").state_dict()}, raw)
    err = error_of(_argv(str(raw), tmp_path, model="DFM-SiT-S/2"))
    assert "cannot load checkpoint" in err and "does not match DFM-SiT-S/2" in err
    not_ckpt = tmp_path / "junk.pt"
    not_ckpt.write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in error_of(_argv(str(not_ckpt), tmp_path))
    assert "checkpoint not found" in error_of(_argv(str(tmp_path / "missing.pt"), tmp_path))
    assert "num_steps_per_scale" in error_of(_argv(ckpt, tmp_path, num_steps_per_scale="[50]"))
    assert "Unknown config key 'num_step'" in error_of(_argv(ckpt, tmp_path, num_step=3))
    assert "config key 'vae'" in error_of(_argv(ckpt, tmp_path, vae=str(tmp_path / "no-vae")))
    assert not list(tmp_path.glob("run*"))


def test_a_rerun_keeps_the_folder_an_earlier_version_named(ckpt, tmp_path, capsys):
    """Run names changed (no -tf32 for the default precision): a run started under the old name is
    continued there, not begun again in a new folder."""
    from generation.config import default_run_name, resolve_config

    cfg = load_config(GenerateConfig, _argv(ckpt, tmp_path, run_name="null", num_samples=4))
    resolved = resolve_config(cfg, arch_name="DFM-SiT-S/2", num_stages=2, num_classes=NUM_CLASSES, input_size=8,
                              ckpt_config={"vae": "none"})
    legacy = default_run_name(resolved, legacy=True)
    assert legacy.endswith("-tf32") and legacy != resolved.run_name
    _run(ckpt, tmp_path, run_name=legacy, num_samples=4)  # the earlier version's run, killed after 2 images:
    for name in ("000002.png", "000003.png"):
        (tmp_path / legacy / name).unlink()
    (tmp_path / f"{legacy}.npz").unlink()
    summary = _run(ckpt, tmp_path, run_name="null", num_samples=4)
    assert summary["run_dir"] == str(tmp_path / legacy) and summary["generated"] == 2
    assert "continuing the run folder" in capsys.readouterr().out
    assert not (tmp_path / resolved.run_name).exists()

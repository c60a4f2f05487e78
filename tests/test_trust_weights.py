"""Third-party weights (Inception, DINOv2 for FDD and REPA, the VAE) never run code from the file:
a `__reduce__` payload is refused with one line on every path that reads them, and its marker
file is never created."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import SMALL_DINOV2, save_payload, save_tiny_vae
from evaluation import evaluate as evaluate_cli
from evaluation import ref_stats as ref_stats_cli
from evaluation.fdd import load_dinov2
from evaluation.inception import InceptionFeatureExtractor, WeightsError, default_inception_weights_path
from evaluation.online import OnlineEvaluator
from evaluation.stats_file import ReferenceStatistics, save_statistics, weights_identity
from models.weights_io import UntrustedCheckpointError

REFUSED = "refusing to load"


@pytest.fixture
def evil(tmp_path):
    """(payload file, marker path): the file holds a tensor and a payload that creates the marker."""
    marker = tmp_path / "pwned"
    return save_payload(tmp_path / "evil.pth", marker, **{"fc.weight": torch.zeros(2, 2)}), marker


def _batch(path, n=5, size=8, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(path, arr_0=images)
    return str(path)


def _one_error_line(capsys, marker, what):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {REFUSED} {what}") and "\n" not in err and "Traceback" not in err, err
    assert "io.open" in err
    assert not marker.exists()


def test_the_payload_is_live_in_torch_fidelitys_own_loader(evil):
    """What the fix avoids: torch-fidelity's constructor unpickles the file fully and runs the payload."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path, marker = evil
    with pytest.raises(Exception):
        FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    assert marker.exists()


def test_inception_payload_refused_by_evaluate_ref_stats_and_the_extractor(evil, tmp_path, capsys):
    path, marker = evil
    with pytest.raises(WeightsError, match=f"{REFUSED} the Inception weights .*evil.pth.*io.open"):
        InceptionFeatureExtractor(path)
    ref, smp = _batch(tmp_path / "ref.npz"), _batch(tmp_path / "smp.npz", seed=1)
    assert evaluate_cli.main([ref, smp, "--inception-weights", path, "--device", "cpu", "--no-progress"]) == 2
    _one_error_line(capsys, marker, "the Inception weights")
    out = tmp_path / "stats.npz"
    assert ref_stats_cli.main([ref, "--out", str(out), "--inception-weights", path, "--no-dinov2",
                               "--device", "cpu", "--no-progress"]) == 2
    _one_error_line(capsys, marker, "the Inception weights")
    assert not out.exists()


def test_inception_payload_in_the_default_cache_is_refused(evil, tmp_path, monkeypatch, capsys):
    path, marker = evil
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = default_inception_weights_path()
    os.makedirs(os.path.dirname(cached))
    shutil.copy(path, cached)
    ref, smp = _batch(tmp_path / "ref.npz"), _batch(tmp_path / "smp.npz", seed=1)
    assert evaluate_cli.main([ref, smp, "--device", "cpu", "--no-progress"]) == 2
    _one_error_line(capsys, marker, "the Inception weights")


def test_training_time_evaluation_refuses_the_payload(evil, tmp_path):
    """`eval_inception_weights`: statistics made (by an attacker) with the same file's hash still
    do not get it unpickled."""
    path, marker = evil
    stats = str(tmp_path / "stats.npz")
    meta = {"num_images": 5, "resolution": [8, 8], "inception": weights_identity(path), "dinov2": None, "swd": None}
    save_statistics(ReferenceStatistics({"mu": np.zeros(4), "sigma": np.eye(4)}, meta), stats)
    with pytest.raises(WeightsError, match=f"{REFUSED} the Inception weights"):
        OnlineEvaluator(stats, ["fid"], (8, 8), inception_weights=path)
    assert not marker.exists()


def test_dinov2_payload_refused_for_fdd_and_for_repa(evil):
    from models.encoders import load_encoders

    path, marker = evil
    with pytest.raises(WeightsError, match=f"{REFUSED} the DINOv2 weights .*io.open"):
        load_dinov2(SMALL_DINOV2, path)
    with pytest.raises(UntrustedCheckpointError, match=f"{REFUSED} the encoder_weights of dinov2-vit-s"):
        load_encoders("dinov2-vit-s", path, resolution=32, arch_overrides=dict(depth=1, embed_dim=24, num_heads=2))
    assert not marker.exists()


def test_vae_folder_with_a_payload_bin_is_refused_and_safetensors_win(tmp_path):
    from data.vae import load_vae

    good = save_tiny_vae(tmp_path / "vae")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_vae"
    evil.mkdir()
    shutil.copy(os.path.join(good, "config.json"), evil / "config.json")
    save_payload(evil / "diffusion_pytorch_model.bin", marker, **{"encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=f"{REFUSED} the VAE weights .*diffusion_pytorch_model.bin.*io.open"):
        load_vae(str(evil))
    assert not marker.exists()
    # Beside safetensors weights, a .bin is never opened.
    shutil.copy(evil / "diffusion_pytorch_model.bin", os.path.join(good, "diffusion_pytorch_model.bin"))
    assert json.load(open(os.path.join(good, "config.json")))["latent_channels"] == load_vae(good).config.latent_channels
    assert not marker.exists()

"""`dataset_tools.py encode` with a tiny random AutoencoderKL (data/encode.py, data/packed.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import data.encode as encode_mod
from data.encode import encode_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INDICES = [0, 1, 3, 4, 1005]  # a gap (2: a skipped source file) and a second folder
LABELS = [2, 0, 1, 1, 0]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An images dataset in the SPEC section 7 layout, written by hand (not by convert)."""
    root = str(tmp_path_factory.mktemp("img") / "images")
    rng = np.random.default_rng(0)
    labels = []
    for idx, lab in zip(INDICES, LABELS):
        rel = f"{idx // 1000:05d}/img{idx:08d}.png"
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(root, rel))
        labels.append([rel, lab])
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"labels": labels, "classes": ["x", "y", "z", "empty"]}, f)
    return root


@pytest.fixture(scope="module")
def per_image(images, vae_dir, tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("lat") / "vae-sd")
    summary = encode_dataset(images, dest, vae=vae_dir, batch_size=2, progress=False, device="cpu")
    return dest, summary


def _expected_moments(images, vae_dir):
    """Independent path: PIL -> [-1, 1] -> vae.encode(...).latent_dist, one image at a time."""
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    out = []
    for idx in INDICES:
        arr = np.asarray(Image.open(os.path.join(images, f"{idx // 1000:05d}/img{idx:08d}.png")), dtype=np.float32)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        out.append(torch.cat([dist.mean, dist.std], 1)[0])
    return out


def _files(folder):
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


def test_per_image_latents(images, vae_dir, per_image):
    dest, summary = per_image
    assert summary["encoded"] == 5
    with open(os.path.join(dest, "dataset.json")) as f:
        meta = json.load(f)
    names = [f"{i // 1000:05d}/img-mean-std-{i:08d}.npy" for i in INDICES]
    assert meta["labels"] == [[n, lab] for n, lab in zip(names, LABELS)]
    assert meta["classes"] == ["x", "y", "z", "empty"]
    expected = _expected_moments(images, vae_dir)
    for name, ref in zip(names, expected):
        arr = np.load(os.path.join(dest, name))
        assert arr.dtype == np.float32 and arr.shape == (8, 4, 4)
        torch.testing.assert_close(torch.from_numpy(arr), ref, rtol=0, atol=1e-5)
    ds = data.open_dataset(os.path.dirname(dest))  # the parent holds vae-sd/
    assert ds.kind == "latents" and ds.item_shape == (8, 4, 4) and ds.num_classes == 4
    assert [ds[i][1] for i in range(len(ds))] == LABELS


def test_packed_latents(images, vae_dir, per_image, tmp_path):
    dest = str(tmp_path / "packed")
    encode_dataset(images, dest, vae=vae_dir, fmt="packed", shard_size=2, batch_size=2, progress=False,
                   device="cpu")
    with open(os.path.join(dest, "index.json")) as f:
        index = json.load(f)
    assert index["num_items"] == 5 and index["item_shape"] == [8, 4, 4]
    assert [(s["file"], s["start"], s["count"]) for s in index["shards"]] == [
        ("shard-00000.npy", 0, 2), ("shard-00001.npy", 2, 2), ("shard-00002.npy", 4, 1)]
    assert np.load(os.path.join(dest, "labels.npy")).tolist() == LABELS
    shard = np.load(os.path.join(dest, "shard-00001.npy"), mmap_mode="r")
    assert shard.shape == (2, 8, 4, 4) and shard.dtype == np.float32
    ds, ref = data.open_dataset(dest), data.open_dataset(per_image[0])
    assert type(ds).__name__ == "PackedLatentDataset" and ds.num_classes == 4 and len(ds) == 5
    for i in range(5):
        torch.testing.assert_close(ds[i][0], ref[i][0], rtol=0, atol=0)  # same batches as per-image
        assert ds[i][1] == ref[i][1]


@pytest.mark.parametrize("fmt", ["per-image", "packed"])
def test_interrupted_encode_resumes_identically(images, vae_dir, tmp_path, monkeypatch, fmt):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    kwargs = dict(vae=vae_dir, fmt=fmt, batch_size=2, shard_size=2, progress=False, device="cpu")
    encode_dataset(images, full, **kwargs)
    real = encode_mod.encode_moments
    calls = []

    def dies_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(encode_mod, "encode_moments", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(images, part, **kwargs)
    monkeypatch.setattr(encode_mod, "encode_moments", real)
    # two batches (per-image: 4 files; packed: shards 0 and 1) were finished before the interrupt
    if fmt == "per-image":
        os.remove(os.path.join(part, "00000", "img-mean-std-00000001.npy"))  # batch {0, 1} half done
    summary = encode_dataset(images, part, **kwargs)
    assert summary["already_done"] == (3 if fmt == "per-image" else 4)
    assert summary["encoded"] + summary["already_done"] == 5
    assert _files(part) == _files(full)

    with pytest.raises(ValueError, match="other settings"):
        encode_dataset(images, part, **{**kwargs, "precision": "bf16"})


def test_bf16_and_argument_errors(images, vae_dir, per_image, tmp_path):
    dest = str(tmp_path / "bf16")
    with pytest.warns(UserWarning, match="bf16 on a CPU"):
        encode_dataset(images, dest, vae=vae_dir, precision="bf16", batch_size=4, progress=False,
                       device="cpu")
    a, b = data.open_dataset(dest), data.open_dataset(per_image[0])
    for i in range(len(a)):
        assert a[i][0].dtype == torch.float32
        assert (a[i][0] - b[i][0]).abs().max() <= 0.05 * b[i][0].abs().max() + 1e-3
    with pytest.raises(ValueError, match="format"):
        encode_dataset(images, dest, vae=vae_dir, fmt="hdf5", device="cpu")
    with pytest.raises(ValueError, match="holds latents, but images were expected"):
        encode_dataset(per_image[0], str(tmp_path / "x"), vae=vae_dir, device="cpu")


@pytest.mark.slow
def test_torchrun_two_processes(images, vae_dir, per_image, tmp_path):
    """The CLI under torchrun (gloo on CPU): each rank writes its share; same latents."""
    dest = str(tmp_path / "ddp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(REPO, "dataset_tools.py"), "encode", "--source", images, "--dest", dest,
         "--vae", vae_dir, "--batch-size", "2", "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 images encoded" in proc.stdout and "2 process(es)" in proc.stdout
    with open(os.path.join(dest, "dataset.json")) as f, open(os.path.join(per_image[0], "dataset.json")) as g:
        assert json.load(f) == json.load(g)
    a, b = data.open_dataset(dest), data.open_dataset(per_image[0])
    for i in range(len(a)):
        torch.testing.assert_close(a[i][0], b[i][0], rtol=0, atol=1e-5)

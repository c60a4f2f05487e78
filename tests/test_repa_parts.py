"""REPA's frozen encoders (models/encoders.py) and the two-view dataset (data/paired.py)."""

import json
import os
import pickle
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import save_tiny_vae
from data.convert import convert_dataset
from data.encode import encode_dataset
from models.encoders import (ENCODERS, check_token_count, encoder_dims, encoder_features, encoder_input_size,
                             load_encoders, parse_enc_type, preprocess_images)

TINY = dict(depth=2, embed_dim=48, num_heads=2)  # a random ViT-S/14 DINOv2 shrunk for CPU tests


# ---------------------------------------------------------------- preprocessing


def _cubic_weights(frac):
    """PyTorch's bicubic kernel (A = -0.75) at distances 1 + f, f, 1 - f, 2 - f."""
    A = -0.75

    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return np.stack([far(1 + frac), near(frac), near(1 - frac), far(2 - frac)], -1)


def _bicubic_matrix(n_in, n_out):
    """(n_out, n_in) matrix of bicubic resampling, align_corners=False, borders clamped, no antialias.

    The source coordinate is rounded to float32 as PyTorch computes it for float32 images (in
    float64 the outputs move by up to 1e-4 at 256 -> 224); the weights and sums are float64.
    """
    m = np.zeros((n_out, n_in))
    scale = np.float32(n_in / n_out)
    for o in range(n_out):
        src = np.float32(scale * np.float32(o + 0.5) - np.float32(0.5))
        i0 = int(np.floor(src))
        for k, w in zip(range(-1, 3), _cubic_weights(np.float64(src - i0))):
            m[o, min(max(i0 + k, 0), n_in - 1)] += w
    return m


def _reference_preprocess(images, size):
    """float64 numpy: / 255, ImageNet mean/std (hand constants), separable bicubic resize."""
    x = images.numpy().astype(np.float64) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406])[None, :, None, None]) / np.array([0.229, 0.224, 0.225])[None, :, None, None]
    m = _bicubic_matrix(x.shape[-1], size)
    return m @ x @ m.T


@pytest.mark.parametrize("resolution,size", [(256, 224), (512, 448), (64, 56)])
def test_preprocess_matches_float64_reference(resolution, size):
    g = torch.Generator().manual_seed(resolution)
    images = torch.randint(0, 256, (2, 3, resolution, resolution), generator=g, dtype=torch.uint8)
    assert encoder_input_size(resolution) == size
    out = preprocess_images(images, size)
    assert out.dtype == torch.float32 and out.shape == (2, 3, size, size)
    np.testing.assert_allclose(out.numpy(), _reference_preprocess(images, size), atol=1e-5)


def test_normalisation_hand_values():
    """A flat image stays flat under resampling: white -> (1 - mean) / std, black -> -mean / std."""
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    images[:, 1] = 255
    out = preprocess_images(images, 28)
    np.testing.assert_allclose(out[0, :, 5, 7].numpy(), [-0.485 / 0.229, 0.544 / 0.224, -0.406 / 0.225], rtol=1e-6)


# ---------------------------------------------------------------- encoders


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A random timm DINOv2 at its native 518 px (37x37 position grid), saved as .pth and .safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, dynamic_img_size=True, **TINY)
    with torch.no_grad():  # LayerScale starts at 1e-5: make the blocks matter
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.normal_(0, 0.5)
    model.eval()
    folder = tmp_path_factory.mktemp("dinov2")
    pth, st = str(folder / "tiny.pth"), str(folder / "tiny.safetensors")
    torch.save(model.state_dict(), pth)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st)
    return model, pth, st


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "folder"])
def test_tiny_dinov2_features_equal_timm_patch_tokens(tiny_dinov2, tmp_path, fmt):
    reference, pth, st = tiny_dinov2
    source = {"pth": pth, "safetensors": st}.get(fmt)
    if fmt == "folder":
        source = str(tmp_path / "timm-folder")
        os.makedirs(source)
        shutil.copy(st, os.path.join(source, "model.safetensors"))
    [encoder] = load_encoders("dinov2-vit-s", source, resolution=256, arch_overrides=TINY)
    assert (encoder.z_dim, encoder.num_tokens, encoder.grid, encoder.input_size) == (48, 256, 16, 224)
    images = torch.randint(0, 256, (2, 3, 256, 256), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    [features] = encoder_features([encoder], images)
    # REPA resamples the 37x37 position embedding to 16x16 once (timm's resample_abs_pos_embed,
    # defaults); timm's dynamic_img_size does the same call on the fly inside the reference.
    x = torch.from_numpy(_reference_preprocess(images, 224)).float()
    with torch.no_grad():
        expected = reference.forward_features(x)[:, reference.num_prefix_tokens:]
    assert features.shape == (2, 256, 48)
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)
    assert expected.abs().mean() > 0.1 and not torch.allclose(features[0], features[1])


def test_encoder_is_frozen_and_outside_checkpoints(tiny_dinov2):
    _, pth, _ = tiny_dinov2
    [encoder] = load_encoders("dinov2-vit-s", pth, resolution=256, arch_overrides=TINY)
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert not isinstance(encoder, torch.nn.Module)  # cannot be registered inside the model
    images = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    with torch.enable_grad():
        out = encoder(images)
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(ValueError, match="256x256 images"):
        encoder(torch.zeros(1, 3, 512, 512, dtype=torch.uint8))


def test_512px_runs_at_448_with_1024_tokens(tiny_dinov2):
    _, pth, _ = tiny_dinov2
    [encoder] = load_encoders("dinov2-vit-s", pth, resolution=512, arch_overrides=TINY)
    assert (encoder.input_size, encoder.grid, encoder.num_tokens) == (448, 32, 1024)
    assert encoder(torch.zeros(1, 3, 512, 512, dtype=torch.uint8)).shape == (1, 1024, 48)


def test_several_encoders(tiny_dinov2):
    _, pth, st = tiny_dinov2
    encs = load_encoders("dinov2-vit-s, dinov2-vit-s", f"{pth},{st}", resolution=256, arch_overrides=TINY)
    feats = encoder_features(encs, torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8))
    assert [f.shape for f in feats] == [(2, 256, 48)] * 2
    torch.testing.assert_close(feats[0], feats[1])
    with pytest.raises(ValueError, match="encoder_weights lists 1 source.*for 2 encoder"):
        load_encoders("dinov2-vit-s,dinov2-vit-s", pth, arch_overrides=TINY)


def test_names_dims_and_timm_widths():
    import timm

    assert parse_enc_type("dinov2-vit-b") == ["dinov2-vit-b"]
    assert parse_enc_type("dinov2-vit-s,dinov2-vit-l") == ["dinov2-vit-s", "dinov2-vit-l"]
    assert encoder_dims("dinov2-vit-s,dinov2-vit-b,dinov2-vit-l,dinov2-vit-g") == [384, 768, 1024, 1536]
    for name, (timm_name, dim) in ENCODERS.items():
        assert "reg" not in timm_name
        with torch.device("meta"):
            model = timm.create_model(timm_name, pretrained=False)
        assert model.embed_dim == dim and model.num_prefix_tokens == 1, name


@pytest.mark.parametrize("bad", ["dinov2-vit-x", "dinov2_vit_b", "dinov2-vit-b,clip-vit-L", "", "mocov3-vit-b"])
def test_unknown_enc_type(bad):
    with pytest.raises(ValueError, match=r"enc_type .*allowed: dinov2-vit-s, dinov2-vit-b, dinov2-vit-l, dinov2-vit-g"):
        load_encoders(bad, None)


def test_bad_resolution():
    with pytest.raises(ValueError, match="resolution 250.*multiple of 16"):
        load_encoders("dinov2-vit-b", None, resolution=250)


def test_missing_weight_file(tmp_path):
    missing = str(tmp_path / "nope" / "dinov2_vitb14_pretrain.pth")
    with pytest.raises(FileNotFoundError, match="encoder_weights: .*nope/dinov2_vitb14_pretrain.pth' does not exist"):
        load_encoders("dinov2-vit-b", missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither model.safetensors nor pytorch_model.bin"):
        load_encoders("dinov2-vit-b", str(tmp_path / "empty"))


def test_wrong_weights_name_the_file(tiny_dinov2):
    _, pth, _ = tiny_dinov2
    with pytest.raises(ValueError, match=r"tiny.pth' does not load into dinov2-vit-s .*size mismatch"):
        load_encoders("dinov2-vit-s", pth, arch_overrides=dict(depth=2))


def test_offline_without_weights_is_one_clear_fast_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.time()
    with pytest.raises(FileNotFoundError) as info:
        load_encoders("dinov2-vit-b,dinov2-vit-g", None)
    assert time.time() - start < 10  # fails before building the 1B-parameter ViT-g
    msg = str(info.value)
    assert "hf download timm/vit_base_patch14_dinov2.lvd142m model.safetensors" in msg
    assert "hf download timm/vit_giant_patch14_dinov2.lvd142m model.safetensors" in msg
    assert "encoder_weights=dinov2-vit-b/model.safetensors,dinov2-vit-g/model.safetensors" in msg
    assert info.value.__cause__ is None and info.value.__context__ is None  # no chained hub traceback


def test_token_count_check(tiny_dinov2):
    _, pth, _ = tiny_dinov2
    encs = load_encoders("dinov2-vit-s", pth, resolution=256, arch_overrides=TINY)
    check_token_count(encs, 16 * 16)  # a /2 model on 32x32 latents
    with pytest.raises(ValueError, match="SiT-B/4 has 64 tokens per image but dinov2-vit-s gives 256"):
        check_token_count(encs, 8 * 8, "SiT-B/4")


# ---------------------------------------------------------------- the two-view dataset

LABELS = [2, 0, 1, 1, 0, 2]


@pytest.fixture(scope="module")
def repa_dir(tmp_path_factory):
    """REPA's layout made by our tools: convert (32x32 PNGs) and encode with a tiny VAE."""
    root = tmp_path_factory.mktemp("repa")
    raw = root / "raw"
    rng = np.random.default_rng(0)
    for i, lab in enumerate(LABELS):
        folder = raw / f"class{lab}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"x{i}.png")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        convert_dataset(str(raw), str(root / "data" / "images"), resolution=(32, 32), workers=1, progress=False)
        vae = save_tiny_vae(root / "vae")
        encode_dataset(str(root / "data" / "images"), str(root / "data" / "vae-sd"), vae=vae, batch_size=3,
                       progress=False, device="cpu")
        encode_dataset(str(root / "data" / "images"), str(root / "packed"), vae=vae, fmt="packed", shard_size=4,
                       batch_size=3, progress=False, device="cpu")
    finally:
        torch.set_num_threads(before)
    return root


def _check_aligned(ds, images_dir):
    meta = json.load(open(os.path.join(images_dir, "dataset.json")))
    assert len(ds) == len(LABELS) and ds.item_shape == (8, 4, 4) and ds.image_shape == (3, 32, 32)
    for i, (rel, lab) in enumerate(meta["labels"]):
        image, moments, label = ds[i]
        expected = np.asarray(Image.open(os.path.join(images_dir, rel)).convert("RGB")).transpose(2, 0, 1)
        assert image.dtype == torch.uint8 and np.array_equal(image.numpy(), expected)
        assert moments.dtype == torch.float32 and moments.shape == (8, 4, 4)
        assert label == lab


def test_repa_layout_pairs_images_and_latents(repa_dir):
    ds = data.open_paired(str(repa_dir / "data"), resolution=32)
    _check_aligned(ds, str(repa_dir / "data" / "images"))
    # the latent of item i is that of image i: compare with the per-image file named after it
    meta = json.load(open(repa_dir / "data" / "vae-sd" / "dataset.json"))
    for i, (rel, _lab) in enumerate(meta["labels"]):
        np.testing.assert_array_equal(ds[i][1].numpy(), np.load(repa_dir / "data" / "vae-sd" / rel))
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone[3][0].numpy(), ds[3][0].numpy())


def test_packed_latents_beside_images_zip(repa_dir, tmp_path):
    from data.storage import zip_folder

    zpath = str(tmp_path / "images.zip")
    zip_folder(str(repa_dir / "data" / "images"), zpath)
    ds = data.open_paired(str(repa_dir / "packed"), images_dir=zpath)
    _check_aligned(ds, str(repa_dir / "data" / "images"))
    per_image = data.open_paired(str(repa_dir / "data"))
    for i in range(len(ds)):
        torch.testing.assert_close(ds[i][1], per_image[i][1], atol=1e-5, rtol=1e-5)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)
    images, moments, labels = next(iter(loader))
    meta = json.load(open(repa_dir / "data" / "images" / "dataset.json"))
    assert images.shape == (3, 3, 32, 32) and moments.shape == (3, 8, 4, 4)
    assert labels.tolist() == [lab for _, lab in meta["labels"][:3]]


def _copy_data(repa_dir, tmp_path):
    dest = tmp_path / "data"
    shutil.copytree(repa_dir / "data", dest)
    return dest


def test_missing_images(repa_dir):
    with pytest.raises(ValueError, match="vae-sd' holds no images or images.zip; set images_dir"):
        data.open_paired(str(repa_dir / "data" / "vae-sd"))


def test_count_mismatch(repa_dir, tmp_path):
    dest = _copy_data(repa_dir, tmp_path)
    meta_path = dest / "images" / "dataset.json"
    meta = json.load(open(meta_path))
    meta["labels"] = meta["labels"][:-1]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match=r"images .*images' and latents .*vae-sd' do not match: 5 images, 6 latents "
                                         r"\(the first unmatched index is 5\)"):
        data.open_paired(str(dest))


def test_label_mismatch(repa_dir, tmp_path):
    dest = _copy_data(repa_dir, tmp_path)
    meta_path = dest / "vae-sd" / "dataset.json"
    meta = json.load(open(meta_path))
    meta["labels"][4][1] = 9
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match=r"vae-sd' do not match: labels differ at index 4 "):
        data.open_paired(str(dest))


def test_file_mismatch_same_count_and_labels(repa_dir, tmp_path):
    """Two items with the same label swapped in the latents' listing: only the names reveal it."""
    dest = _copy_data(repa_dir, tmp_path)
    meta_path = dest / "vae-sd" / "dataset.json"
    meta = json.load(open(meta_path))
    labels = [lab for _, lab in meta["labels"]]
    a, b = [i for i, lab in enumerate(labels) if lab == labels[1]][:2]
    meta["labels"][a], meta["labels"][b] = meta["labels"][b], meta["labels"][a]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match=rf"do not match: index {a} is image .*img-mean-std-.*but the latents have"):
        data.open_paired(str(dest))


def test_packed_file_mismatch(repa_dir, tmp_path):
    packed = tmp_path / "packed"
    shutil.copytree(repa_dir / "packed", packed)
    files = json.load(open(packed / "files.json"))
    files[2] = "00000/img00000099.png"
    json.dump(files, open(packed / "files.json", "w"))
    with pytest.raises(ValueError, match=r"index 2 is image .*source image \(files.json\)"):
        data.open_paired(str(packed), images_dir=str(repa_dir / "data" / "images"))


def test_resolution_mismatch(repa_dir, tmp_path):
    with pytest.raises(ValueError, match=r"images .* are 32x32, but the run expects 256x256 \(resolution\)"):
        data.open_paired(str(repa_dir / "data"), resolution=256)
    # images converted at another size than the encoded ones
    other = tmp_path / "images64"
    convert_dataset(str(repa_dir / "raw"), str(other), resolution=(64, 64), workers=1, progress=False)
    with pytest.raises(ValueError, match=r"latents \(8, 4, 4\) come from 32x32 images, the images are 64x64"):
        data.open_paired(str(repa_dir / "data"), images_dir=str(other))


@pytest.mark.parametrize("fmt", ["per-image", "packed"])
def test_paired_loader_benchmark_smoke(capsys, fmt):
    from data.benchmark import main

    main(["paired-loader", "--images", "6", "--batch-size", "2", "--workers", "0", "--convert-workers", "1",
          "--format", fmt])
    out = capsys.readouterr().out
    assert "6 images 256x256" in out and f"{fmt} latents (8, 32, 32)" in out
    assert "paired loader, 0 worker(s)" in out and "4 images in" in out

"""data.vae: loading, moments, latent sampling, decoding, uint8 rounding (SPEC section 1)."""

import os
import time

import numpy as np
import pytest
import torch

from conftest import tiny_vae
from data import vae as dvae

os.environ.setdefault("HF_HUB_OFFLINE", "1")




pytestmark = pytest.mark.usefixtures("one_thread")


def test_to_uint8_rounds_to_nearest():
    # level = 127.5 * x + 127.5; expected = round half up, clamped (independent float64 numpy)
    levels = np.array([-3.0, 0.0, 0.49, 0.5, 1.2, 127.5, 128.49, 254.5, 254.6, 255.0, 300.0])
    x = torch.tensor((levels - 127.5) / 127.5, dtype=torch.float64).float()
    img = x.view(1, 1, 1, -1).expand(1, 3, 1, -1)
    out = dvae.to_uint8(img)
    assert out.shape == (1, 1, len(levels), 3) and out.dtype == torch.uint8
    expected = np.clip(np.floor(levels + 0.5), 0, 255)
    assert out[0, 0, :, 0].tolist() == expected.astype(int).tolist()
    ends = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    assert dvae.to_uint8(ends)[0, 0, :, 0].tolist() == [0, 128, 255]


def test_load_vae_from_folder_and_errors(vae_dir, tmp_path):
    vae = dvae.load_vae(vae_dir)
    ref = tiny_vae()
    for (k, a), (_, b) in zip(vae.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert next(dvae.load_vae(vae_dir, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16

    with pytest.raises(FileNotFoundError, match="does not exist"):
        dvae.load_vae(str(tmp_path / "no-such-vae"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        dvae.load_vae(str(tmp_path / "empty"))
    start = time.time()
    with pytest.raises(RuntimeError, match=r"stabilityai/sd-vae-ft-ema.*not in the local"):
        dvae.load_vae("ft-ema")  # short name -> hub name; offline -> immediate clear error
    assert time.time() - start < 10


def test_encode_moments_matches_posterior(vae_dir):
    vae = dvae.load_vae(vae_dir)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    moments = dvae.encode_moments(vae, images)
    assert moments.shape == (2, 8, 4, 4) and moments.dtype == torch.float32
    with torch.no_grad():
        x = images.double() / 255 * 2 - 1
        dist = vae.encode(x.float()).latent_dist
        logvar = torch.clamp(dist.logvar, -30.0, 20.0)
    torch.testing.assert_close(moments[:, :4], dist.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(moments[:, 4:], torch.exp(0.5 * logvar), rtol=1e-5, atol=1e-6)
    # float input in [-1, 1] and NHWC uint8 give the same moments
    torch.testing.assert_close(dvae.encode_moments(vae, x.float()), moments, rtol=0, atol=1e-5)
    torch.testing.assert_close(dvae.encode_moments(vae, images.permute(0, 2, 3, 1)), moments, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="3 colour channels"):
        dvae.encode_moments(vae, torch.zeros(1, 4, 8, 8))


def test_sample_latents_and_decode(vae_dir):
    moments = torch.randn(3, 8, 4, 4)
    moments[:, 4:] = moments[:, 4:].abs()
    z = dvae.sample_latents(moments, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, (moments[:, :4] + moments[:, 4:] * eps) * 0.18215)
    assert dvae.LATENT_SCALE == 0.18215

    vae = dvae.load_vae(vae_dir)
    images = dvae.decode_to_uint8(vae, z)
    assert images.shape == (3, 32, 32, 3) and images.dtype == torch.uint8
    with torch.no_grad():
        x = vae.decode(z / 0.18215).sample.double()
    expected = torch.clamp(torch.floor(127.5 * x + 127.5 + 0.5), 0, 255).permute(0, 2, 3, 1)
    assert (images.double() - expected).abs().max() <= 1  # float32 vs float64 at .5 boundaries
    assert (images.double() == expected).float().mean() > 0.99

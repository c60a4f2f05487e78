"""DINOv2 features for FDD: hub-style position-embedding resize, preprocessing, weight formats."""
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from evaluation.fdd import (DinoV2FeatureExtractor, interpolate_pos_embed_like_hub, load_dinov2,
                            preprocess_for_dinov2)
from evaluation.inception import WeightsError

SMALL = "vit_small_patch14_dinov2.lvd142m"


def _keys_cubic(x, a=-0.75):
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0


def _resize_matrix(src_size, dst_size, scale):
    """Row j: weights over source samples of output j (source coordinate (j + 0.5) / scale - 0.5)."""
    w = np.zeros((dst_size, src_size))
    for j in range(dst_size):
        s = (j + 0.5) / scale - 0.5
        base = math.floor(s)
        for i in range(base - 1, base + 3):
            w[j, min(max(i, 0), src_size - 1)] += _keys_cubic(s - i)
    return w


def test_pos_embed_resize_matches_hand_written_bicubic_with_hub_offset():
    m, g, d = 37, 16, 3
    pos = torch.randn(1, 1 + m * m, d, generator=torch.Generator().manual_seed(0))
    out = interpolate_pos_embed_like_hub(pos, g)
    assert out.shape == (1, 1 + g * g, d)
    torch.testing.assert_close(out[:, 0], pos[:, 0])  # the class-token slot is kept
    w = _resize_matrix(m, g, (g + 0.1) / m)  # DINOv2 hub: scale_factor = (16 + 0.1) / 37
    grid = pos[0, 1:].double().numpy().reshape(m, m, d)
    expected = np.einsum("ai,bj,ijc->abc", w, w, grid).reshape(g * g, d)
    np.testing.assert_allclose(out[0, 1:].double().numpy(), expected, atol=1e-5)
    assert interpolate_pos_embed_like_hub(pos, m) is pos


def test_preprocessing_is_pil_bicubic_then_imagenet_normalisation():
    images = np.random.default_rng(0).integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
    x = preprocess_for_dinov2(images, size=28)
    resized = np.asarray(Image.fromarray(images[1]).resize((28, 28), Image.BICUBIC)).astype(np.float64) / 255
    expected = (resized - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x[1].permute(1, 2, 0).numpy(), expected, atol=1e-5)


@pytest.fixture(scope="module")
def small_dinov2_state():
    model = timm.create_model(SMALL, pretrained=False, num_classes=0)  # native 518 px, 37x37 grid
    state = model.state_dict()
    for key in state:
        if key.endswith(".gamma"):  # layer scale 1e-5 at init would make every image look alike
            state[key] = torch.full_like(state[key], 0.2)
    return state


def test_features_are_the_final_norm_cls_token_and_meta_format_loads(tmp_path, small_dinov2_state):
    timm_file, meta_file = tmp_path / "timm.pth", tmp_path / "meta.pth"
    torch.save(small_dinov2_state, timm_file)
    torch.save(dict(small_dinov2_state, mask_token=torch.zeros(1, 384)), meta_file)  # Meta's key set
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    model = load_dinov2(SMALL, str(timm_file))
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    feats = DinoV2FeatureExtractor(model)(images)
    with torch.no_grad():  # independent: timm's own head (global_pool="token" after the final norm)
        expected = model(preprocess_for_dinov2(images)).numpy()
    assert feats.shape == (2, 384)
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(feats[0] - feats[1]).max() > 1e-3
    meta = DinoV2FeatureExtractor(load_dinov2(SMALL, str(meta_file)))(images)
    np.testing.assert_allclose(meta, feats, rtol=1e-6, atol=1e-6)


def test_missing_or_wrong_dinov2_weights(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_dinov2(SMALL, str(tmp_path / "absent.pth"))
    torch.save({"something": torch.zeros(2)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="not loadable"):
        load_dinov2(SMALL, str(tmp_path / "wrong.pth"))

"""Crops and colour-mode handling of `dataset_tools.py convert` (data/transforms.py)."""

import numpy as np
import pytest
from PIL import Image

from data.transforms import apply_transform, center_crop, center_crop_dhariwal, parse_resolution, to_rgb


def _blocks(small: np.ndarray, k: int = 2) -> np.ndarray:
    """Each pixel of `small` (H, W, 3) repeated as a k x k block."""
    return np.kron(small, np.ones((k, k, 1), dtype=small.dtype))


def test_dhariwal_hand_computed_box_halving_and_crop():
    # 8x4 image, target 2x2: both sides >= 2x target -> one box halving to 4x2; 4x2 is no longer
    # >= 4x4, the short side already equals 2 (bicubic is the identity), then the centre crop
    # takes columns (4 - 2) // 2 = 1 .. 2. PIL's box filter (what ADM calls) is separable with
    # uint8 rounding (half up) after the horizontal and after the vertical pass.
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)
    out = np.asarray(center_crop_dhariwal(Image.fromarray(img), (2, 2)))
    x = img.astype(np.int64)
    rows = np.floor((x[:, 0::2] + x[:, 1::2]) / 2 + 0.5)
    halved = np.floor((rows[0::2] + rows[1::2]) / 2 + 0.5)  # (2, 4, 3)
    np.testing.assert_array_equal(out, halved[:, 1:3])
    assert out.shape == (2, 2, 3)


def test_dhariwal_exact_on_block_image():
    small = np.random.default_rng(1).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    img = Image.fromarray(_blocks(small))  # 128x64: one halving gives `small` exactly
    out = np.asarray(center_crop_dhariwal(img, (32, 32)))
    np.testing.assert_array_equal(out, small[:, 16:48])


@pytest.mark.parametrize(
    "size, target, steps",
    [
        # 1200x700 -> 64: halve while the short side >= 128: 600x350, 300x175, 150x87;
        # bicubic to round(150 * 64 / 87) = 110 x 64; crop x from (110 - 64) // 2 = 23.
        ((1200, 700), 64, [(600, 350), (300, 175), (150, 87)]),
        # 33x20 -> 64: smaller than the target, no halving; bicubic up to round(33 * 3.2) = 106 x 64.
        ((33, 20), 64, []),
        # 11x4 -> 6: long side 16.5 -> Python round (ADM) gives 16.
        ((11, 4), 6, []),
    ],
)
def test_dhariwal_follows_the_adm_steps(size, target, steps):
    rng = np.random.default_rng(2)
    src = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref = src
    for step in steps:
        ref = ref.resize(step, resample=Image.Resampling.BOX)
    short = min(ref.size)
    ref = ref.resize(tuple(round(s * target / short) for s in ref.size), resample=Image.Resampling.BICUBIC)
    left, top = (ref.width - target) // 2, (ref.height - target) // 2
    ref = np.asarray(ref)[top:top + target, left:left + target]
    out = np.asarray(center_crop_dhariwal(src, (target, target)))
    np.testing.assert_array_equal(out, ref)


def test_center_crop_hand_computed():
    img = np.random.default_rng(3).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    out = np.asarray(center_crop(Image.fromarray(img), (4, 4)))  # 4x4 crop from column 1, no resize
    np.testing.assert_array_equal(out, img[:, 1:5])
    assert center_crop(Image.fromarray(img), (3, 2)).size == (3, 2)


def test_none_keeps_or_resizes():
    img = np.random.default_rng(4).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(apply_transform(Image.fromarray(img), "none", (8, 8))), img)
    assert apply_transform(Image.fromarray(img), "none", (4, 6)).size == (4, 6)
    with pytest.raises(ValueError, match="unknown transform"):
        apply_transform(Image.fromarray(img), "random-crop", (8, 8))


def test_to_rgb_modes():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 0, 128)   # half transparent
    rgba[0, 1] = (10, 20, 30, 255)    # opaque
    rgba[1, :] = (0, 0, 0, 0)         # fully transparent black
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).astype(int)
    a = 128 / 255
    expected = [200 * a + 255 * (1 - a), 100 * a + 255 * (1 - a), 255 * (1 - a)]  # over white
    assert np.abs(out[0, 0] - expected).max() <= 1
    assert out[0, 1].tolist() == [10, 20, 30]
    assert (out[1] == 255).all()

    gray = Image.fromarray(np.array([[0, 77], [200, 255]], dtype=np.uint8), "L")
    out = np.asarray(to_rgb(gray))
    assert out.shape == (2, 2, 3) and (out == np.array([[0, 77], [200, 255]])[..., None]).all()

    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 0, 0, 0), (0, 0, 0, 255), (255, 0, 0, 0)])
    assert np.asarray(to_rgb(cmyk)).tolist() == [[[255, 255, 255], [0, 0, 0], [0, 255, 255]]]

    pal = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.info["transparency"] = 0
    assert np.asarray(to_rgb(pal)).tolist() == [[[255, 255, 255], [0, 0, 255]]]

    deep = Image.fromarray(np.array([[65535, 25700]], dtype=np.uint16))  # 16-bit greyscale
    assert np.asarray(to_rgb(deep))[0, :, 0].tolist() == [255, 100]


def test_parse_resolution():
    assert parse_resolution("256x256") == (256, 256)
    assert parse_resolution("512x256") == (512, 256)
    assert parse_resolution("64") == (64, 64)
    for bad in ("abc", "0x4", "1x2x3"):
        with pytest.raises(ValueError, match="resolution"):
            parse_resolution(bad)

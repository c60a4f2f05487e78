"""Image preparation for `dataset_tools.py convert`: colour-mode normalisation and crops.

Every function takes and returns a PIL image; the crops return exactly `size = (width, height)`.

- `center-crop-dhariwal` (ADM, SPEC section 7): box-halve while the image is at least twice
  the target in both sides, bicubic-resize so the image just covers the target (for a square
  target: short side = target, long side rounded with Python's `round`), centre crop
  (offsets floored). For square targets this is exactly ADM's `center_crop_arr`.
- `center-crop`: centre crop to the target aspect ratio, then Lanczos resize (EDM style).
- `none`: no crop; an image of another size is resized (Lanczos) to the target, aspect ratio
  not kept.

Images smaller than the target are upscaled by the same rule (bicubic for the ADM crop,
Lanczos for the others).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

TRANSFORMS = ("center-crop-dhariwal", "center-crop", "none")

# Background used where an image has transparency: alpha is composited onto white,
# because the colour under fully transparent pixels is arbitrary (often black).
ALPHA_BACKGROUND = (255, 255, 255)


def parse_resolution(text: str) -> tuple[int, int]:
    """'256x256' or '256' -> (width, height)."""
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        if len(parts) == 1:
            width = height = int(parts[0])
        elif len(parts) == 2:
            width, height = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"resolution must look like 256x256 (width x height), got {text!r}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"resolution must be positive, got {text!r}")
    return width, height


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Transparency (RGBA, LA, PA, palette with a transparent index) is composited onto white.
    16/32-bit integer greyscale ('I;16', 'I') is scaled to 8 bits when it exceeds 255;
    float greyscale ('F') is clipped to [0, 255]. CMYK, YCbCr, L, 1, P use PIL's conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if mode != "F" and arr.size and arr.max() > 255:
            arr = arr / 257.0  # 16-bit range -> 8-bit range
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")


def _centre_crop_box(src_w: int, src_h: int, width: int, height: int) -> tuple[int, int, int, int]:
    left = (src_w - width) // 2
    top = (src_h - height) // 2
    return left, top, left + width, top + height


def center_crop_dhariwal(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """ADM crop: box-halve while both sides are >= 2x the target, bicubic, centre crop."""
    width, height = size
    while img.width >= 2 * width and img.height >= 2 * height:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = max(width / img.width, height / img.height)
    new_size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(new_size, resample=Image.Resampling.BICUBIC)
    return img.crop(_centre_crop_box(img.width, img.height, width, height))


def center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Largest centred crop of the target aspect ratio, then Lanczos resize to the target."""
    width, height = size
    crop_w = min(img.width, img.height * width // height)
    crop_h = min(img.height, img.width * height // width)
    img = img.crop(_centre_crop_box(img.width, img.height, crop_w, crop_h))
    if img.size != (width, height):
        img = img.resize((width, height), resample=Image.Resampling.LANCZOS)
    return img


def resize_only(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`none`: keep the image as it is when it already has the target size, else resize."""
    if img.size != tuple(size):
        img = img.resize(tuple(size), resample=Image.Resampling.LANCZOS)
    return img


_TRANSFORM_FNS = {
    "center-crop-dhariwal": center_crop_dhariwal,
    "center-crop": center_crop,
    "none": resize_only,
}


def apply_transform(img: Image.Image, transform: str, size: tuple[int, int]) -> Image.Image:
    """RGB-convert `img` and bring it to `size` = (width, height) with the named transform."""
    if transform not in _TRANSFORM_FNS:
        raise ValueError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    return _TRANSFORM_FNS[transform](to_rgb(img), tuple(size))

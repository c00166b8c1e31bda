"""OpenAI CLIP preprocessing with PIL and numpy only (EASYNLP.md §3).

CLIP's own pipeline is torchvision's
``Compose([Resize(n, BICUBIC), CenterCrop(n), convert("RGB"), ToTensor(), Normalize(MEAN, STD)])``
on PIL images. v2t must feed the frame encoder exactly those pixels (the encoder was trained on
them, and training and prediction share this module), without importing torch. So the geometry
below copies torchvision's arithmetic, including its rounding, and the resampling is PIL's own,
which is what torchvision calls for PIL inputs.

The work is split in two so training can cache the expensive part: ``crop_frame`` (decode-side,
uint8) and ``normalize`` (cheap, float32).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# normalize() as a lookup table: uint8 has only 256 values per channel, so the float64 result of
# ((v / 255) - mean) / std is computed once and rounded to float32 once. That is as exact as
# float32 can be, and faster than arithmetic on every pixel.
NORMALIZE_TABLE = ((np.arange(256, dtype=np.float64)[None, :] / 255.0 - np.array(CLIP_MEAN)[:, None])
        / np.array(CLIP_STD)[:, None]).astype(np.float32)  # (3, 256)
NORMALIZE_TABLE.setflags(write=False)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: the shorter side becomes `size`, the
    longer one ``int(size * long / short)``. Truncation, not rounding, is what torchvision does,
    and a one-pixel difference here shifts the whole center crop."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's ``CenterCrop(size)`` on a PIL image."""
    width, height = image.size
    if width < size or height < size:
        # torchvision pads with zeros (split left/right and top/bottom, the odd pixel going
        # right/bottom) before cropping. After Resize the image is never smaller than the crop,
        # but crop_frame is also correct on its own.
        pad_w, pad_h = max(size - width, 0), max(size - height, 0)
        padded = Image.new(image.mode, (width + pad_w, height + pad_h))  # zero-filled
        if image.mode == "P" and (palette := image.getpalette()) is not None:
            padded.putpalette(palette)  # index 0 pads with palette entry 0, like torchvision
        padded.paste(image, (pad_w // 2, pad_h // 2))
        image = padded
        width, height = image.size
    # Python's round() is round-half-to-even; torchvision uses it, so an odd margin of 1 gives
    # offset 0 and a margin of 3 gives offset 2. Floor division (as some ports do) differs.
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def crop_frame(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bicubic), center-crop `size`, convert to RGB.
    Returns uint8 (3, size, size), not yet normalized (training caches these).

    The order resize → crop → RGB is CLIP's and matters: PIL resizes palette ("P") images with
    nearest-neighbour whatever filter is asked, and resizes RGBA with premultiplied alpha."""
    if size < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    new_size = resized_size(*image.size, size)
    if new_size != image.size:  # torchvision returns the image untouched when the size is right
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    image = _center_crop(image, size).convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))  # (3, S, S)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., 3, S, S) → float32 (..., 3, S, S): scale to [0, 1], then CLIP mean/std."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {pixels.dtype}")
    if pixels.ndim < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"normalize expects shape (..., 3, S, S), got {pixels.shape}")
    out = np.empty(pixels.shape, dtype=np.float32)
    for c in range(3):
        out[..., c, :, :] = NORMALIZE_TABLE[c][pixels[..., c, :, :]]
    return out


def preprocess_images(images: Sequence[Image.Image], size: int) -> np.ndarray:
    """The whole CLIP pipeline on a clip's frames: float32 (F, 3, size, size)."""
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    return normalize(np.stack([crop_frame(im, size) for im in images]))

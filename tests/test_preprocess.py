"""CLIP preprocessing against an independent float64 reference (and transformers, if present)."""
from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

import numpy as np
import pytest
from PIL import Image

from v2t_engine.inputs.preprocess import (CLIP_MEAN, CLIP_STD, _center_crop, crop_frame, normalize,
                                   preprocess_images, resized_size)


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def smooth(w: int, h: int) -> Image.Image:
    """A smooth gradient: resampling differences stay small on it, unlike on noise."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 100 * np.sin(x / 7 + y / 5)], -1)
    return Image.fromarray(rgb.round().astype(np.uint8))


def reference(image: Image.Image, size: int) -> np.ndarray:
    """CLIP's pipeline re-derived without v2t's code: float64 (3, size, size)."""
    w, h = image.size
    # Shorter side → size; the longer side floor(size * long / short), in exact integer arithmetic.
    new_w, new_h = (size, size * h // w) if w <= h else (size * w // h, size)
    # Resize in the image's own mode, RGB after: PIL resizes palette images with nearest
    # neighbour and RGBA with premultiplied alpha, so converting first would give other pixels.
    # (Converting before the crop is fine: conversion is per pixel.)
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC).convert("RGB"))
    # Center crop offsets: Python's round() of margin/2, i.e. round half to even.
    top = int((Decimal(new_h - size) / 2).to_integral_value(ROUND_HALF_EVEN))
    left = int((Decimal(new_w - size) / 2).to_integral_value(ROUND_HALF_EVEN))
    crop = resized[top:top + size, left:left + size].astype(np.float64) / 255.0  # (S, S, 3)
    return ((crop - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)


CASES = [  # (width, height, size): landscape, portrait, square, smaller than the crop, odd margins
    (320, 240, 224),
    (97, 61, 32),
    (50, 83, 32),
    (64, 64, 32),
    (64, 64, 64),  # no resize at all
    (20, 13, 32),  # upscaled
    (35, 32, 32),  # margin 3: offset 2 (round half to even), not 1 (floor)
    (33, 32, 32),  # margin 1: offset 0
    (32, 35, 32),  # the same, vertically
    (32, 37, 32),  # margin 5: offset 2
    (1000, 30, 24),  # extreme aspect ratio
]


@pytest.mark.parametrize("w, h, size", CASES)
def test_matches_float64_reference(w, h, size):
    image = noise(w, h, seed=w * h)
    out = preprocess_images([image], size)
    assert out.shape == (1, 3, size, size) and out.dtype == np.float32
    assert np.abs(out[0] - reference(image, size)).max() < 1e-5


@pytest.mark.parametrize("mode", ["P", "RGBA", "L", "CMYK"])
def test_matches_reference_in_other_modes(mode):
    # Non-RGB frames: conversion to RGB must come after resize and crop, as in CLIP.
    rng = np.random.default_rng(5)
    rgba = Image.fromarray(rng.integers(0, 256, (45, 70, 4), dtype=np.uint8), "RGBA")
    image = rgba.convert("RGB").quantize(64) if mode == "P" else rgba.convert(mode)
    if mode == "RGBA":
        image = rgba  # random alpha: premultiplied resizing differs from resizing RGB
    out = preprocess_images([image], 32)
    assert np.abs(out[0] - reference(image, 32)).max() < 1e-5


def test_resize_geometry_truncates_like_torchvision():
    assert resized_size(320, 240, 224) == (298, 224)  # 224 * 320 / 240 = 298.67 → 298
    assert resized_size(240, 320, 224) == (224, 298)
    assert resized_size(100, 100, 7) == (7, 7)
    assert resized_size(3, 2, 5) == (7, 5)  # 7.5 → 7


def test_center_crop_offsets_round_half_to_even():
    columns = np.arange(35, dtype=np.uint8)[None, :].repeat(32, 0)
    image = Image.fromarray(np.stack([columns] * 3, -1))  # pixel value = its column
    assert crop_frame(image, 32)[0, 0, 0] == 2  # margin 3 → left offset round(1.5) = 2


def test_center_crop_pads_with_zeros_when_the_image_is_smaller():
    image = Image.new("RGB", (3, 2), (255, 255, 255))
    out = np.asarray(_center_crop(image, 6))  # (6, 6, 3)
    # torchvision: left/top get margin // 2, the odd pixel goes right/bottom.
    expected = np.zeros((6, 6), dtype=bool)
    expected[2:4, 1:4] = True
    np.testing.assert_array_equal(out[..., 0] == 255, expected)


def test_crop_frame_is_uint8_chw_and_rgb():
    out = crop_frame(Image.new("L", (40, 30), 77), 16)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert (out == 77).all()


def test_normalize_values_shapes_and_errors():
    # (B, F, 3, H, W) = (2, 4, 3, 3, 2), each row of pixels holding 0, 128 then 255.
    pixels = np.broadcast_to(np.array([0, 128, 255], dtype=np.uint8)[:, None], (2, 4, 3, 3, 2)).copy()
    out = normalize(pixels)
    assert out.shape == pixels.shape and out.dtype == np.float32
    for c in range(3):
        expected = (np.array([0, 128, 255]) / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
        np.testing.assert_allclose(out[0, 0, c, :, 0], expected, atol=1e-6)
    with pytest.raises(TypeError):
        normalize(pixels.astype(np.float32))
    with pytest.raises(ValueError):
        normalize(np.zeros((4, 8, 8), dtype=np.uint8))


def test_preprocess_images_stacks_frames():
    images = [noise(40, 30, seed=i) for i in range(4)]
    out = preprocess_images(images, 16)
    assert out.shape == (4, 3, 16, 16) and out.dtype == np.float32
    np.testing.assert_array_equal(out, normalize(np.stack([crop_frame(im, 16) for im in images])))
    with pytest.raises(ValueError):
        preprocess_images([], 16)


@pytest.mark.slow  # importing transformers alone takes ~3 s
def test_matches_transformers_clip_image_processor():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    # The PIL implementation (transformers 5 names it CLIPImageProcessorPil; in 4.x the plain
    # CLIPImageProcessor is it). Its torchvision backend resizes with torch's bicubic instead of
    # PIL's, so it is not a reference for CLIP's PIL pipeline.
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    size = 224
    processor = cls(do_resize=True, size={"shortest_edge": size}, do_center_crop=True,
                    crop_size={"height": size, "width": size},
                    image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))

    def theirs(image):
        return np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0])

    # Landscape 400x300 → 298x224, horizontal margin 74 (even). Measured max difference 2.4e-7:
    # one float32 rounding step (they rescale then normalize in float32; v2t rounds a float64
    # lookup table once). 1e-5 is the same bound as the float64 reference test; a wrong filter,
    # crop offset or mean/std moves noise pixels by ~1, five orders of magnitude more.
    image = noise(400, 300, seed=7)
    ours = preprocess_images([image], size)[0]
    assert theirs(image).shape == ours.shape
    assert np.abs(theirs(image) - ours).max() < 1e-5

    # 401x300 → 299x224, margin 75 (odd): torchvision (CLIP) crops at round(37.5) = 38,
    # transformers at 75 // 2 = 37. v2t follows CLIP, so the two are one column apart.
    image = noise(401, 300, seed=8)
    ours, other = preprocess_images([image], size)[0], theirs(image)
    assert np.abs(other - ours).max() > 0.5
    assert np.abs(other[..., 1:] - ours[..., :-1]).max() < 1e-5

"""The built-in default dataset: short clips of a coloured shape that moves or changes size,
captioned in Chinese, written as EasyNLP tables (EASYNLP.md §2).

Every clip shows one shape of one colour doing one motion; its caption is
`一个{colour}的{shape}{motion}`, e.g. "一个红色的圆形从左向右移动" (4 shapes x 5 colours x 7 motions =
140 captions). Clips are deterministic from the seed; start positions, sizes, colour shades,
background and frame size are jittered so no two clips are alike.

Learnability: a motion spans the whole clip linearly, so any prefix of frames already shows its
direction (with 6 frames and frame_num=4 the first 4 frames cover 60% of the travel). Shapes stay
inside the centred square of side min(width, height), the region CLIP's center crop keeps.
Pure PIL + numpy; nothing here imports torch.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError

SHAPES: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "红色": (220, 40, 40), "绿色": (40, 180, 60), "蓝色": (50, 90, 235),
    "黄色": (235, 210, 40), "紫色": (150, 60, 200),
}
MOTIONS: tuple[str, ...] = ("从左向右移动", "从右向左移动", "向上移动", "向下移动",
                            "逐渐变大", "逐渐变小", "保持不动")
FRAME_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (80, 64), (64, 80), (96, 72))  # (width, height)
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}  # each split draws from its own stream


def caption(colour: str, shape: str, motion: str) -> str:
    """The one caption template: "一个{colour}的{shape}{motion}"."""
    return f"一个{colour}的{SHAPES[shape]}{motion}"


def all_captions() -> list[str]:
    """Every caption the generator can write (140), in a fixed order."""
    return [caption(c, s, m) for s in SHAPES for c in COLOURS for m in MOTIONS]


def _combos() -> list[tuple[str, str, str]]:
    return [(c, s, m) for s in SHAPES for c in COLOURS for m in MOTIONS]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a square, upward triangle or five-pointed star of "radius" r around (cx, cy)."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy - r * math.sin(a))
                for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]
    # star: alternate outer and inner (0.45 r) points, starting at the top
    return [(cx + rr * math.cos(math.pi / 2 + k * math.pi / 5), cy - rr * math.sin(math.pi / 2 + k * math.pi / 5))
            for k in range(10) for rr in [r if k % 2 == 0 else 0.45 * r]]


def make_clip(rng: np.random.Generator, colour: str, shape: str, motion: str,
              frames: int = 6, size: tuple[int, int] = (64, 64)) -> list[Image.Image]:
    """Render one clip as RGB PIL images. The motion is linear over all `frames` frames."""
    w, h = size
    side = min(w, h)
    x0, y0 = (w - side) / 2, (h - side) / 2  # the centred square that a center crop keeps
    r = side * rng.uniform(0.11, 0.15)
    travel = side * rng.uniform(0.45, 0.55)  # distance covered by a move over the clip
    lo, hi = r + 2, side - r - 2  # keep the whole shape inside the square

    # Start/end centre and radius, in square coordinates.
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    r_start = r_end = r
    if motion in ("从左向右移动", "从右向左移动"):
        start = rng.uniform(lo, hi - travel)
        ax, bx = (start, start + travel) if motion == "从左向右移动" else (start + travel, start)
        ay = by = cy
    elif motion in ("向上移动", "向下移动"):
        start = rng.uniform(lo, hi - travel)
        ay, by = (start + travel, start) if motion == "向上移动" else (start, start + travel)
        ax = bx = cx
    else:
        small, big = side * rng.uniform(0.07, 0.09), side * rng.uniform(0.26, 0.3)
        if motion == "逐渐变大":
            r_start, r_end = small, big
        elif motion == "逐渐变小":
            r_start, r_end = big, small
        if motion != "保持不动":  # room for the biggest size
            cx = cy = side / 2 + rng.uniform(-1, 1) * (side / 2 - big - 2)
        ax = bx = cx
        ay = by = cy

    fill = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, 3), 0, 255)
    bg_level = int(rng.integers(20, 70))  # dark grey, so every colour stands out
    noise_sigma = float(rng.uniform(2, 6))
    out: list[Image.Image] = []
    for t in range(frames):
        a = t / (frames - 1) if frames > 1 else 0.0
        px, py = x0 + ax + (bx - ax) * a, y0 + ay + (by - ay) * a
        pr = r_start + (r_end - r_start) * a
        img = Image.new("RGB", (w, h), (bg_level,) * 3)
        draw = ImageDraw.Draw(img)
        colour_t = tuple(int(v) for v in fill)
        if shape == "circle":
            draw.ellipse([px - pr, py - pr, px + pr, py + pr], fill=colour_t)
        else:
            draw.polygon(_polygon(shape, px, py, pr), fill=colour_t)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, noise_sigma, (h, w, 1))
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out


def encode_frames(images: list[Image.Image], image_format: str = "jpeg") -> str:
    """The imgbase64 field: a JSON list of standard base64 strings, one per frame."""
    fmt = image_format.lower()
    if fmt not in ("jpeg", "jpg", "png"):
        raise ConfigError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    encoded = []
    for im in images:
        buf = io.BytesIO()
        if fmt == "png":
            im.save(buf, format="PNG")
        else:
            im.save(buf, format="JPEG", quality=90)
        encoded.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return json.dumps(encoded)


def iter_split(split: str, n: int, frames: int, seed: int,
               image_format: str = "jpeg") -> Iterator[tuple[str, str, str]]:
    """Yield (idx, imgbase64, caption) rows of one split, lazily.

    Captions are balanced: each consecutive block of 140 rows is a shuffled permutation of all
    captions. Each split has its own random stream, so test clips are unseen draws.
    """
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
    combos = _combos()
    order: list[int] = []
    for i in range(n):
        if not order:
            order = list(rng.permutation(len(combos)))
        colour, shape, motion = combos[order.pop()]
        size = FRAME_SIZES[int(rng.integers(len(FRAME_SIZES)))]
        images = make_clip(rng, colour, shape, motion, frames=frames, size=size)
        yield f"{split}_{i + 1:06d}", encode_frames(images, image_format), caption(colour, shape, motion)


def write_dataset(out_dir: str | Path, n_train: int = 800, n_val: int = 100, n_test: int = 100,
                  frames: int = 6, seed: int = 0, image_format: str = "jpeg") -> dict[str, Path]:
    """Write train.txt / val.txt (idx, frames, caption), test.txt (idx, frames: what predict
    reads) and test_refs.txt (idx, caption) under `out_dir`. Rows are streamed to `*.tmp` files
    that are renamed when complete. Returns {"train", "val", "test", "test_refs"} -> path."""
    if frames < 1:
        raise ConfigError(f"frames must be at least 1, got {frames}")
    if min(n_train, n_val, n_test) < 0:
        raise ConfigError(f"split sizes must be >= 0, got {n_train}, {n_val}, {n_test}")
    encode_frames([], image_format)  # validate the format before writing anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"{k}.txt" for k in ("train", "val", "test", "test_refs")}

    def stream(files: dict[str, Path], rows: Iterator[tuple[str, str, str]], with_caption: bool) -> None:
        tmp = {k: p.with_name(p.name + ".tmp") for k, p in files.items()}
        handles = {k: open(p, "w", encoding="utf-8", newline="\n") for k, p in tmp.items()}
        try:
            for idx, imgs, cap in rows:
                if with_caption:
                    handles["table"].write(f"{idx}\t{imgs}\t{cap}\n")
                else:
                    handles["table"].write(f"{idx}\t{imgs}\n")
                    handles["refs"].write(f"{idx}\t{cap}\n")
        finally:
            for f in handles.values():
                f.close()
        for k, p in files.items():
            os.replace(tmp[k], p)

    stream({"table": paths["train"]}, iter_split("train", n_train, frames, seed, image_format), True)
    stream({"table": paths["val"]}, iter_split("val", n_val, frames, seed, image_format), True)
    stream({"table": paths["test"], "refs": paths["test_refs"]},
           iter_split("test", n_test, frames, seed, image_format), False)
    return paths

"""The built-in synthetic dataset: deterministic, well-formed EasyNLP tables."""
from __future__ import annotations

import base64
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from v2t_engine.errors import ConfigError
from v2t_engine.jobs.synth import FRAME_SIZES, all_captions, make_clip, write_dataset


def _rows(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\r" not in text
    return [line.split("\t") for line in text.splitlines()]


def _decode(field: str) -> list[Image.Image]:
    frames = json.loads(field)
    assert isinstance(frames, list)
    images = []
    for b64 in frames:
        im = Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))  # what EasyNLP does
        im.load()
        images.append(im)
    return images


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_dataset(tmp_path_factory.mktemp("synth"), n_train=30, n_val=5, n_test=7, frames=6, seed=3)


def test_files_are_well_formed(dataset: dict[str, Path]) -> None:
    assert set(dataset) == {"train", "val", "test", "test_refs"}
    captions = set(all_captions())
    for split, n in (("train", 30), ("val", 5)):
        rows = _rows(dataset[split])
        assert len(rows) == n
        for i, (idx, frames, cap) in enumerate(rows, 1):
            assert idx == f"{split}_{i:06d}"
            assert cap in captions
            images = _decode(frames)
            assert len(images) == 6
            assert all(im.format == "JPEG" and im.mode == "RGB" for im in images)
            assert len({im.size for im in images}) == 1 and images[0].size in FRAME_SIZES
    test, refs = _rows(dataset["test"]), _rows(dataset["test_refs"])
    assert [len(r) for r in test] == [2] * 7
    assert [r[0] for r in test] == [r[0] for r in refs] == [f"test_{i:06d}" for i in range(1, 8)]
    assert all(r[1] in captions for r in refs)
    assert all(len(_decode(r[1])) == 6 for r in test)


def test_deterministic_and_seed_dependent(tmp_path: Path, dataset: dict[str, Path]) -> None:
    same = write_dataset(tmp_path / "a", n_train=30, n_val=5, n_test=7, frames=6, seed=3)
    for k in dataset:
        assert same[k].read_bytes() == dataset[k].read_bytes()
    other = write_dataset(tmp_path / "b", n_train=30, n_val=5, n_test=7, frames=6, seed=4)
    assert other["train"].read_bytes() != dataset["train"].read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_captions_are_balanced(tmp_path: Path) -> None:
    n = len(all_captions())
    assert n == 140 and len(set(all_captions())) == n
    paths = write_dataset(tmp_path, n_train=n, n_val=0, n_test=0, frames=2, seed=0)
    counts = Counter(r[2] for r in _rows(paths["train"]))
    assert set(counts.values()) == {1}  # one full block: every caption exactly once
    assert paths["val"].read_text(encoding="utf-8") == ""


def test_png_and_frame_count(tmp_path: Path) -> None:
    paths = write_dataset(tmp_path, n_train=2, n_val=1, n_test=1, frames=3, seed=1, image_format="png")
    images = _decode(_rows(paths["train"])[0][1])
    assert len(images) == 3 and all(im.format == "PNG" for im in images)
    with pytest.raises(ConfigError, match="gif"):
        write_dataset(tmp_path, image_format="gif")


def _centroid(im: Image.Image) -> tuple[float, float, float]:
    """x, y and area of the pixels brighter than the dark background."""
    a = np.asarray(im, dtype=np.float32).max(axis=2)
    ys, xs = np.nonzero(a > 110)
    return float(xs.mean()), float(ys.mean()), float(len(xs))


@pytest.mark.parametrize("motion,axis,sign", [
    ("从左向右移动", 0, 1), ("从右向左移动", 0, -1), ("向上移动", 1, -1), ("向下移动", 1, 1),
    ("逐渐变大", 2, 1), ("逐渐变小", 2, -1)])
def test_motion_is_visible_in_first_four_frames(motion: str, axis: int, sign: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        frames = make_clip(rng, "黄色", "square", motion, frames=6, size=(80, 64))
        stats = [_centroid(f)[axis] for f in frames[:4]]
        steps = np.diff(stats) * sign
        assert (steps > 0).all(), (motion, stats)


def test_static_shape_stays() -> None:
    frames = make_clip(np.random.default_rng(1), "红色", "circle", "保持不动", frames=6)
    xs = [_centroid(f)[0] for f in frames]
    assert max(xs) - min(xs) < 1.0

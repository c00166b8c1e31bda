"""The Python API: load an export (or a checkpoint) once, caption videos.

    from v2t_engine import Captioner
    cap = Captioner.load("export_dir")
    captions = cap.caption_pixels(pixels)  # (B, F, 3, S, S) float32 → [[caption, ...], ...]
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Backend
from ..errors import ArtifactError, ConfigError
from .generator import generate_candidates, stream_captions
from .manifest import Manifest, is_export_dir
from .search import SearchOptions
from ..tokenizer import CaptionTokenizer

BACKENDS = ("auto", "ort", "torch")


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def load_backend(path: str | Path, backend: str = "auto", device: str = "cpu",
                 threads: int | None = None) -> tuple[Backend, CaptionTokenizer]:
    """An export directory runs on ONNX Runtime, a training checkpoint on PyTorch."""
    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a directory (expected an export or a checkpoint)")
    if backend == "auto":
        if is_export_dir(path):
            backend = "ort"
        elif _is_checkpoint_dir(path):
            backend = "torch"
        else:
            raise ArtifactError(f"{path} holds neither an export (manifest.json) nor a training "
                                "checkpoint (config.json + model.safetensors)")
    if backend == "ort":
        from .backends.ort import OrtBackend

        if not is_export_dir(path):
            raise ArtifactError(f"--backend ort needs an export directory; {path} has no manifest.json "
                                f"(run `v2t export --checkpoint_dir {path} --output EXPORT_DIR`)")
        ort_backend = OrtBackend(path, device=device, threads=threads)
        return ort_backend, CaptionTokenizer.from_dir(path / ort_backend.manifest.tokenizer_file)
    if not _is_checkpoint_dir(path):
        raise ArtifactError(f"--backend torch needs a training checkpoint; {path} lacks "
                            "config.json or model.safetensors")
    from v2t_training.torch_backend import TorchBackend

    torch_backend = TorchBackend(path, device=device, threads=threads)
    return torch_backend, torch_backend.tokenizer


class Captioner:
    def __init__(self, backend: Backend, tokenizer: CaptionTokenizer):
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = backend.config

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", device: str = "cpu",
             threads: int | None = None) -> "Captioner":
        return cls(*load_backend(path, backend, device, threads))

    def max_new_tokens(self, text_len: int | None) -> int:
        """Caption length limit: the model's text_len unless a shorter one is asked for. Longer is
        possible up to the position table, but the model never saw captions that long."""
        cfg = self.config
        if text_len is None:
            return cfg.text_len
        limit = cfg.block_size - cfg.frame_num
        if not 1 <= text_len <= limit:
            raise ConfigError(f"text_len={text_len} must be between 1 and {limit} for this model")
        return text_len

    def generate_ids(self, pixels: np.ndarray, opts: SearchOptions = SearchOptions(),
                     rng: np.random.Generator | None = None, text_len: int | None = None) -> np.ndarray:
        """pixels (B, F, 3, S, S) CLIP-normalized → token ids (B, num_return, T)."""
        if rng is None:
            rng = np.random.default_rng(opts.seed)
        return generate_candidates(self.backend, pixels, opts, rng, self.max_new_tokens(text_len))

    def caption_pixels(self, pixels: np.ndarray, opts: SearchOptions = SearchOptions(),
                       rng: np.random.Generator | None = None, text_len: int | None = None) -> list[list[str]]:
        return [self.decode_candidates(video) for video in self.generate_ids(pixels, opts, rng, text_len)]

    def caption_stream(self, videos: Iterable[tuple[Any, np.ndarray]], opts: SearchOptions = SearchOptions(),
                       text_len: int | None = None, slots: int = 8) -> Iterator[tuple[Any, list[str]]]:
        """(key, pixels (F, 3, S, S) CLIP-normalized) → (key, captions) in the order captions
        finish, with continuous batching over `slots` decoder rows (generator.py); opts.seed
        keys the sampling. Videos are read lazily, as slots free up."""
        stream = stream_captions(self.backend, videos, opts, self.max_new_tokens(text_len), slots, opts.seed)
        for key, ids in stream:
            yield key, self.decode_candidates(ids)

    def decode_candidates(self, ids: np.ndarray) -> list[str]:
        """Token ids (n, T) of one video → its n captions."""
        return [self.tokenizer.decode(c) for c in ids.tolist()]

"""What the generator needs from a backend, and how backends are found.

A backend runs the three graphs of the contract (contract.py): the frame encoder, the prefill
over a batch of videos' frame embeddings, and the decode step over the fixed-length KV buffer.
``slot_decoder.BoundSlotDecoder`` owns the buffers, in the array module ``xp`` of the memory the
backend's graphs run in, and hands the backend views of them. Everything else (search, the
generator, detokenizing) is shared by all backends.

A backend that steps its cache its own way (torch-fast's CUDA graphs) also has
``slot_decoder(slots, frame_num, max_new_tokens)``, which returns its own
``slot_decoder.SlotDecoder``. One whose decode graph takes a KV buffer of one length only (a
TensorRT engine's profile fixes it) says so in ``fixed_cache_len``, which ``BoundSlotDecoder``
allocates. One whose encoder runs on a device, so that encoding costs the host little and may
overlap the decoder's steps, sets ``encodes_ahead`` (``generator.EncodeAhead``; ``encode_frames``
is then called from other threads, at the same time as the decoder runs). ``devices`` and
``explains_refusals`` are described in ``backends/__init__.py``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from ...config import ModelConfig
from ...tokenizer import CaptionTokenizer


class Backend(Protocol):
    name: ClassVar[str]
    loads: ClassVar[str]  # what `accepts`, for messages: "an export directory (manifest.json) ..."
    config: ModelConfig
    tokenizer: CaptionTokenizer
    precision: str  # what it computes in: fp32, bf16, fp16 or an export's int8 variant
    xp: Any  # the array module of the memory its decoder runs in: numpy, or a device module (CuPy)

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None, verify: bool = False,
                 precision: str | None = None):
        """Load what `path` holds; `verify` checks file digests where the format records them.
        `precision` asks for a compute precision where the backend chooses one at load time
        (None: the backend's default); a backend whose precision is fixed by its files refuses
        another one."""

    @classmethod
    def accepts(cls, path: Path) -> bool:
        """True when `path` holds what this backend loads (its `auto` choice)."""

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """frames (N, 3, S, S) uint8 crops (``preprocess.crop_frame``) → embeddings (N, n_embd)
        float32 on the host. The backend normalizes them exactly as ``preprocess.normalize``
        does, where its graphs run: a quarter of the bytes cross to a device."""

    def prefill(self, prefix, logits, kv_out: Sequence) -> None:
        """Each video's frame embeddings, prefix (B, F, E) float32 → the logits of its first
        token into ``logits`` (B, V) and its frames' keys/values into ``kv_out`` (B, nh, F, hs)
        per cache tensor, in contract order. Every argument is an ``xp`` array."""

    def decode(self, input_ids, position_ids, cache: Sequence, logits, kv_out: Sequence) -> None:
        """One token per row: input_ids and position_ids (B, 1) int64; ``cache`` (B, nh, L, hs)
        per cache tensor, of which a row reads the columns before its position; writes the
        logits (B, V) and the token's keys/values (B, nh, 1, hs) into ``logits`` and ``kv_out``.
        Every argument is a C-contiguous ``xp`` array the caller owns. A backend may keep what it
        bound for these very objects and reuse it when they are passed again, so a caller never
        passes the same objects (lists included) over other memory."""

"""What the generator needs from a backend. Backends own their sessions; the KV cache the
generator drives is numpy arrays in contract order (``past_key_values.{i}.key|value``)."""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ...config import ModelConfig


class Backend(Protocol):
    name: str
    config: ModelConfig

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """frames (N, 3, S, S) float32, CLIP-normalized → (N, n_embd) float32."""

    def empty_cache(self, batch: int) -> Any:
        """The KV cache before the prefix step (past length 0)."""

    def decode(self, input_ids: np.ndarray, prefix_embeds: np.ndarray, position_ids: np.ndarray,
               attention_mask: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        """One decoder step (see contract.py) → last-position logits (B, V) float32 and the cache
        extended by this step, newly allocated (validation and the reference use it)."""

    def decode_into(self, input_ids: np.ndarray, prefix_embeds: np.ndarray, position_ids: np.ndarray,
                    attention_mask: np.ndarray, past: list[np.ndarray],
                    present: list[np.ndarray]) -> np.ndarray:
        """One decoder step writing the extended cache into the caller's ``present`` arrays
        (float32, C-contiguous, (B, nh, S, hs) in contract order) → logits (B, V). The generator
        uses it so the cache lives in preallocated buffers (kv_cache.py)."""

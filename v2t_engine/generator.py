"""Batched caption generation with the KV cache: prefill the frame prefix, then one token per
step, all rows in lock-step; rows that have ended keep feeding [PAD] until the batch is done."""
from __future__ import annotations

import numpy as np

from .backends.base import Backend
from .search import SearchOptions, select_tokens


def encode_videos(backend: Backend, pixels: np.ndarray) -> np.ndarray:
    """pixels (B, F, 3, S, S) → prefix embeddings (B, F, E)."""
    B, F = pixels.shape[:2]
    emb = backend.encode(np.ascontiguousarray(pixels.reshape(B * F, *pixels.shape[2:])))  # (B*F, E)
    return emb.reshape(B, F, -1)


def generate_tokens(backend: Backend, prefix: np.ndarray, opts: SearchOptions,
                    rng: np.random.Generator, max_new_tokens: int) -> np.ndarray:
    """prefix (B, F, E) → token ids (B, max_new_tokens) int64, pad_id after each caption's end.

    The first caption token is predicted from the last frame position (no BOS token, EASYNLP §5).
    """
    pad = backend.config.pad_id
    B, F, E = prefix.shape
    out = np.full((B, max_new_tokens), pad, dtype=np.int64)
    if max_new_tokens == 0 or B == 0:
        return out
    logits, cache = backend.decode(
        np.zeros((B, 0), np.int64), prefix.astype(np.float32, copy=False),
        np.broadcast_to(np.arange(F, dtype=np.int64), (B, F)).copy(), np.ones((B, F), np.int64),
        backend.empty_cache(B))
    no_prefix = np.zeros((B, 0, E), np.float32)
    done = np.zeros(B, dtype=bool)
    for t in range(max_new_tokens):
        token = select_tokens(logits, opts, rng)
        token[done] = pad
        out[:, t] = token
        done |= token == pad
        if done.all() or t == max_new_tokens - 1:
            break
        logits, cache = backend.decode(
            token[:, None], no_prefix, np.full((B, 1), F + t, np.int64),
            np.ones((B, F + t + 1), np.int64), cache)
    return out


def generate_candidates(backend: Backend, pixels: np.ndarray, opts: SearchOptions,
                        rng: np.random.Generator, max_new_tokens: int) -> np.ndarray:
    """pixels (B, F, 3, S, S) → token ids (B, num_return, max_new_tokens)."""
    prefix = encode_videos(backend, pixels)  # (B, F, E)
    B = prefix.shape[0]
    n = opts.num_return
    if opts.candidates_identical:
        tokens = generate_tokens(backend, prefix, opts, rng, max_new_tokens)  # (B, T)
        return np.repeat(tokens[:, None, :], n, axis=1)
    tokens = generate_tokens(backend, np.repeat(prefix, n, axis=0), opts, rng, max_new_tokens)  # (B*n, T)
    return tokens.reshape(B, n, -1)

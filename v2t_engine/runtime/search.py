"""Token selection from logits: greedy, or sampling with temperature, top-k and top-p.

Pure numpy on the host: the search never calls a backend, so it is tested with hand-made logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class SearchOptions:
    do_sample: bool = False
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    temperature: float = 1.0
    num_return: int = 1  # EasyNLP's max_generated_num: candidates per video
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0.0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.num_return < 1:
            raise ConfigError(f"max_generated_num must be >= 1, got {self.num_return}")

    @property
    def candidates_identical(self) -> bool:
        """Greedy candidates of one video are all the same: compute one, repeat it."""
        return not self.do_sample


def select_tokens(logits: np.ndarray, opts: SearchOptions, rng: np.random.Generator) -> np.ndarray:
    """logits (B, V) → chosen token ids (B,) int64."""
    if not opts.do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    probs = token_probabilities(logits, opts)
    # Inverse-CDF sampling, one uniform draw per row: reproducible for a seeded generator. The
    # first token whose cumulative mass exceeds u: a zero-probability (filtered) token never is,
    # even for u = 0; when rounding leaves the total mass below u, the last token that can be.
    u = rng.random((probs.shape[0], 1))
    chosen = (np.cumsum(probs, axis=-1) <= u).sum(axis=-1)
    last = probs.shape[-1] - 1 - (probs[:, ::-1] > 0).argmax(axis=-1)
    return np.minimum(chosen, last).astype(np.int64)


def token_probabilities(logits: np.ndarray, opts: SearchOptions) -> np.ndarray:
    """logits (B, V) → the distribution `select_tokens` samples from (B, V) float64: logits /
    temperature, the top-k filter, softmax, then the top-p filter (renormalized).

    With top_p = 1 this is EasyNLP's `generate` step (logits / temperature, `top_k_logits`,
    softmax); tests/test_easynlp_parity.py checks it against a torch rendering of that code.
    """
    scores = logits.astype(np.float64) / opts.temperature  # float64: softmax of large logits
    if opts.top_k and opts.top_k < scores.shape[-1]:  # k >= V keeps every token
        scores = _top_k_filter(scores, opts.top_k)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if opts.top_p < 1.0:
        probs = _top_p_filter(probs, opts.top_p)
    return probs


def _top_k_filter(scores: np.ndarray, k: int) -> np.ndarray:
    """-inf below the k-th largest score of each row. Ties at the k-th value all survive (so more
    than k tokens may), as in EasyNLP's `top_k_logits` (`out[out < v[..., [-1]]] = -inf`)."""
    kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]  # (B, 1)
    return np.where(scores < kth, -np.inf, scores)


def _top_p_filter(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest prefix (by probability) whose mass reaches top_p; the first token always
    survives. Renormalized."""
    order = np.argsort(-probs, axis=-1)
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= top_p
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    probs = np.where(drop, 0.0, probs)
    return probs / probs.sum(axis=-1, keepdims=True)

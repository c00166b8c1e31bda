"""Token selection from logits: greedy, sampling with temperature, top-k and top-p, and beam
search; optional repetition penalty and n-gram blocking on top of any of them.

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
    num_beams: int = 1  # 1: no beam search (greedy or sampling)
    length_penalty: float = 1.0  # a finished beam scores sum(log p) / length ** length_penalty
    early_stopping: bool = False  # beams stop once num_beams captions ended, not when none can improve
    no_repeat_ngram_size: int = 0  # 0: off; n: no n-gram of tokens occurs twice in a caption
    repetition_penalty: float = 1.0  # 1: off; > 1 makes tokens already in the caption less likely

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0.0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.num_return < 1:
            raise ConfigError(f"max_generated_num must be >= 1, got {self.num_return}")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.repetition_penalty <= 0.0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams > 1 and self.do_sample:
            raise ConfigError(f"num_beams={self.num_beams} with do_sample: beam sampling is not "
                              "supported; use either beams or sampling")
        if self.num_beams > 1 and self.num_return > self.num_beams:
            raise ConfigError(f"max_generated_num={self.num_return} is more than num_beams="
                              f"{self.num_beams}: beam search returns at most num_beams captions")

    @property
    def uses_beams(self) -> bool:
        return self.num_beams > 1

    @property
    def adjusts_logits(self) -> bool:
        """Repetition penalty or n-gram blocking is on."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    @property
    def candidates_identical(self) -> bool:
        """Greedy candidates of one video are all the same: compute one, repeat it."""
        return not self.do_sample and not self.uses_beams

    @property
    def rows_per_video(self) -> int:
        """Decoder rows (batch slots) one video takes: 1 for greedy (its candidates are
        identical), num_return for sampling, num_beams for beam search."""
        if self.uses_beams:
            return self.num_beams
        return 1 if self.candidates_identical else self.num_return


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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(B, V) → log-probabilities (B, V) float64; -inf logits stay -inf."""
    scores = logits.astype(np.float64)
    top = scores.max(axis=-1, keepdims=True)
    return scores - top - np.log(np.exp(scores - top).sum(axis=-1, keepdims=True))


def adjust_logits(logits: np.ndarray, history: np.ndarray, lengths: np.ndarray, opts: SearchOptions) -> np.ndarray:
    """The repetition penalty and n-gram blocking of `opts` applied to logits (B, V), given each
    row's caption so far: history (B, T) token ids, of which the first lengths (B,) are written.

    The repetition penalty (CTRL's, as Hugging Face applies it) divides a positive logit of a
    token already in the caption by the penalty and multiplies a negative one by it.
    no_repeat_ngram_size n gives -inf to every token that would repeat an n-gram of the caption.
    Returns `logits` itself when both are off, else a new array."""
    if not opts.adjusts_logits:
        return logits
    out = logits.astype(np.float32, copy=True)
    if opts.repetition_penalty != 1.0:
        written = np.arange(history.shape[1])[None, :] < lengths[:, None]  # (B, T)
        rows = np.broadcast_to(np.arange(len(out))[:, None], history.shape)
        seen = np.zeros(out.shape, bool)
        seen[rows[written], history[written]] = True
        p = opts.repetition_penalty
        out = np.where(seen, np.where(out > 0, out / p, out * p), out).astype(np.float32)
    if opts.no_repeat_ngram_size:
        for b in range(len(out)):
            out[b, banned_ngram_tokens(history[b, :lengths[b]], opts.no_repeat_ngram_size)] = -np.inf
    return out


def banned_ngram_tokens(tokens: np.ndarray, n: int) -> np.ndarray:
    """The tokens that, written next, would repeat an n-gram already in `tokens` (1-D)."""
    if len(tokens) < n:
        return np.zeros(0, np.int64)
    grams = np.lib.stride_tricks.sliding_window_view(tokens, n)  # (L - n + 1, n)
    repeats = (grams[:, :-1] == tokens[len(tokens) - n + 1:]).all(axis=1)  # same first n-1 tokens
    return grams[repeats, -1]


def top_candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """scores (n, m) → indices (n, k) of each row's k largest, largest first; ties in index
    order, so a row's result depends on its own values only."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (n, k) some k largest, unordered
    kth = scores[np.arange(len(part))[:, None], part].min(axis=1)
    # Where more than k values reach the k-th largest, which k argpartition kept is arbitrary:
    # those rows take the first in index order.
    for i in np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k):
        above = np.flatnonzero(scores[i] >= kth[i])
        part[i] = above[np.argsort(-scores[i, above], kind="stable")][:k]
    rows = np.arange(len(part))[:, None]
    order = np.lexsort((part, -scores[rows, part]), axis=-1)  # value down, then index up
    return part[rows, order]


class BeamSearch:
    """Beam search over one video's K = num_beams decoder rows.

    Every step extends the K beams by every token and ranks the K·V candidates by the sum of
    their tokens' log-probabilities. Among the best K, a candidate ending in [PAD] is a finished
    caption; the best K that do not end become the new beams (so the beams are always K, as the
    rows are). A finished caption of n tokens, its [PAD] counted, scores sum / n ** length_penalty;
    the best K are kept. The search ends at the length limit (the best K candidates of the last
    step are finished captions), or once K captions are finished and either early_stopping is on
    or the best beam, scored at its current length, cannot beat the worst kept caption (exact for
    length_penalty 0, Hugging Face's rule otherwise).

    Usage, with logits for each beam's next token:
        beams = BeamSearch(opts, max_new=16, pad=0)
        while not beams.done:
            parents, tokens = beams.step(logits_of(beams.tokens))  # beam j ← beam parents[j] + tokens[j]
        captions = beams.best(opts.num_return)
    `step_beams` steps several videos' searches at once.
    """

    def __init__(self, opts: SearchOptions, max_new: int, pad: int):
        K = opts.num_beams
        self.opts, self.max_new, self.pad = opts, max_new, pad
        self.tokens = np.full((K, max_new), pad, np.int64)  # each beam's caption so far
        self.length = 0  # tokens written, the same for every beam
        # Sum of log-probabilities per beam; the rows start identical (one prefix), so only the
        # first one is live at the first step.
        self.scores = np.full(K, -np.inf)
        self.scores[0] = 0.0
        self.finished: list[tuple[float, int, np.ndarray]] = []  # (score, arrival, tokens), best first
        self._arrivals = 0
        self.done = False

    def step(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """logits (K, V) of each beam's next token → (parents (K,), tokens (K,)): beam j now
        continues the former beam parents[j] with tokens[j] (`self.tokens` is updated). Once
        `done` is set, the beams are over and what this returned is not to be decoded."""
        parents, tokens = step_beams([self], logits[None])
        return parents[0], tokens[0]

    def _keep(self, total: float, n: int, caption: np.ndarray) -> None:
        score = total / n ** self.opts.length_penalty
        self.finished.append((score, self._arrivals, caption))
        self._arrivals += 1
        self.finished.sort(key=lambda h: (-h[0], h[1]))
        del self.finished[self.opts.num_beams:]

    def _cannot_improve(self) -> bool:
        if len(self.finished) < self.opts.num_beams:
            return not np.isfinite(self.scores).any()
        if self.opts.early_stopping:
            return True
        return self.scores.max() / self.length ** self.opts.length_penalty <= self.finished[-1][0]

    def best(self, n: int) -> np.ndarray:
        """(n, max_new) token ids of the n best finished captions, best first, [PAD] after each
        end (the last one repeated if fewer finished)."""
        captions = [c for _, _, c in self.finished[:n]] or [np.full(self.max_new, self.pad, np.int64)]
        return np.stack(captions + captions[-1:] * (n - len(captions)))

    def best_scores(self, n: int) -> np.ndarray:
        return np.array([s for s, _, _ in self.finished[:n]])


def step_beams(searches: list[BeamSearch], logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One step of several videos' searches with the same options, at once: logits (n, K, V) →
    parents (n, K) and tokens (n, K), row i as `BeamSearch.step` of video i. The arithmetic runs
    on all videos together; what stays per video (finished captions, the end test) is a few
    scalars."""
    opts, pad = searches[0].opts, searches[0].pad
    n, K, V = logits.shape
    lengths = np.array([b.length for b in searches])
    history = np.stack([b.tokens for b in searches])  # (n, K, T)
    rows = logits.reshape(n * K, V)
    rows = adjust_logits(rows, history.reshape(n * K, -1), np.repeat(lengths, K), opts)
    scores = np.stack([b.scores for b in searches])  # (n, K)
    total = (scores[:, :, None] + log_softmax(rows).reshape(n, K, V)).reshape(n, K * V)  # beam k + token t: k·V + t
    last = np.array([b.length + 1 == b.max_new for b in searches])
    order = top_candidates(total, 2 * K)  # (n, 2K)
    parents, chosen = np.divmod(order, V)
    video = np.arange(n)[:, None]
    cand = total[video, order]
    ends = (chosen == pad) | last[:, None]
    for i, r in zip(*np.nonzero(ends[:, :K] & np.isfinite(cand[:, :K]))):  # finished captions
        b = searches[i]
        caption = b.tokens[parents[i, r]].copy()
        caption[b.length] = chosen[i, r]
        b._keep(cand[i, r], b.length + 1, caption)
    go_on = np.argsort(ends, axis=1, kind="stable")[:, :K]  # the best K that do not end
    enough = (~ends).sum(axis=1) >= K  # at most K of 2K candidates end, unless at the limit
    parents, chosen, cand = parents[video, go_on], chosen[video, go_on], cand[video, go_on]
    tokens = history[video, parents]  # (n, K, T)
    tokens[video, np.arange(K)[None, :], lengths[:, None]] = chosen
    for i, b in enumerate(searches):
        if last[i] or not enough[i]:
            b.done = True
            continue
        b.scores, b.tokens, b.length = cand[i], tokens[i], b.length + 1
        b.done = b._cannot_improve()
    return parents, chosen

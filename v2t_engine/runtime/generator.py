"""Caption generation with continuous batching over a pool of decoder slots.

Each slot runs one caption: its video's frame prefix is prefilled, then it gains one token per
step together with the other slots. When a caption ends ([PAD]) or reaches the length limit, its
slot is free and is refilled with the next video instead of idling until the longest caption of a
batch ends. The first caption token is predicted from the last frame position (no BOS token,
EASYNLP §5).

Rows of one step have different past lengths: each row attends to its own columns of the shared
cache only (state.py), so a row's tokens do not depend on what the other slots hold: greedy
captions equal one-at-a-time decoding (tested). Sampling draws from one random stream per
caption, keyed by the video's ordinal and the candidate number, so a seed gives the same samples
whatever the number of slots.

Beam search (search.BeamSearch) gives a video num_beams slots, filled from one prefill. After
each step the search picks each beam's parent; the rows whose parent is another row take that
row's cache columns and tokens, copied in place in the slot cache, and the video's slots are
freed together when its search ends. Other videos, greedy, sampled or beams, run in the other
slots of the same steps, and a video's beams read its own rows only, so its captions do not
depend on them (tested).

``CaptionGenerator`` is pull-style (``add`` videos, ``generate_next_token`` until ``is_done``),
so a caller that receives videos one at a time (a service) can feed the running batch;
``stream_captions`` drives it over an iterable.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from .backends.base import Backend
from .search import BeamSearch, SearchOptions, adjust_logits, select_tokens, step_beams
from .slot_decoder import BoundSlotDecoder, SlotDecoder
from .state import SlotState


def stack_pixels(videos: Sequence[Video]) -> np.ndarray:
    """The videos' crops as one (k, F, 3, S, S) array; ValueError when their shapes differ."""
    shapes = sorted({v[1].shape for v in videos})
    if len(shapes) > 1:
        raise ValueError(f"videos of one batch have frames of different shapes (frames, 3, size, size): {shapes}")
    return np.stack([v[1] for v in videos])


def encode_videos(backend: Backend, pixels: np.ndarray) -> np.ndarray:
    """pixels (B, F, 3, S, S) uint8 crops → prefix embeddings (B, F, E),
    as the backend returns them (a GPU backend may keep them on the device)."""
    B, F = pixels.shape[:2]
    emb = backend.encode_frames(np.ascontiguousarray(pixels.reshape(B * F, *pixels.shape[2:])))  # (B*F, E)
    return emb.reshape(B, F, -1)


def refill_threshold(slots: int) -> int:
    """Free slots to wait for before refilling while other captions still run.

    A prefill call reads every weight once whatever its size, so it costs about one decoder step
    (measured on the full model: 1 video 68 ms, 8 videos 186 ms, a step of 8 slots 94 ms), while
    a free slot wastes 1/slots of each step it idles. Refilling R slots at a time costs per video
    about c/R + R·L/(2·slots²) steps (c ≈ 0.7, L ≈ 16 tokens a caption), smallest near
    R = slots/4."""
    return max(1, -(-slots // 4))


Video = tuple[Any, np.ndarray] | tuple[Any, np.ndarray, SearchOptions]
PLAIN, ONE_BY_ONE, BEAM = 0, 1, 2  # greedy rows batched; sampled or adjusted rows one by one; beams


@dataclass
class _Video:
    key: Any
    opts: SearchOptions
    rows: np.ndarray  # its decoder slots
    candidates: np.ndarray  # (n, T) token ids, pad-filled
    remaining: int
    beams: BeamSearch | None = None


class CaptionGenerator:
    """Captions for videos added while it runs.

        gen = CaptionGenerator(backend, SearchOptions(), max_new_tokens=16, slots=8)
        gen.add([(key, pixels)])            # pixels (F, 3, S, S), CLIP-normalized
        gen.add([(key2, pixels2, SearchOptions(do_sample=True, top_k=5, seed=1))])  # its own search
        while not gen.is_done():
            for key, ids in gen.generate_next_token():  # ids (num_return, T), pad after the end
                ...

    A video takes ``opts.rows_per_video`` slots (1 greedy, num_return sampling, num_beams beam
    search) and frees them when its captions end. Sampling streams: a video added with its own
    options whose ``seed`` is set draws from streams keyed by (that seed, candidate number) only,
    so its samples do not depend on the other videos; every other video's streams are keyed by
    the generator's ``seed`` and the video's ordinal (the order of `add`), as `stream_captions`
    and predict use them.
    """

    def __init__(self, backend: Backend, opts: SearchOptions, max_new_tokens: int, slots: int = 8,
                 seed: int | None = None):
        cfg = backend.config
        self.backend, self.opts = backend, opts
        self.per_video = opts.rows_per_video  # slots per video with the generator's options
        self.slots = max(slots, self.per_video)
        self.state = SlotState(self.slots, max_new_tokens, cfg.pad_id)
        self.decoder: SlotDecoder | None = None  # made for the first videos' frame count
        self.owner: list[tuple[_Video, int] | None] = [None] * self.slots  # (video, candidate)
        self.rngs: list[np.random.Generator | None] = [None] * self.slots
        self.kind = np.zeros(self.slots, np.int8)  # each slot's caption: PLAIN, ONE_BY_ONE or BEAM
        self.beaming: dict[int, _Video] = {}  # videos in beam search, by id
        self.entropy = np.random.SeedSequence(seed).entropy
        self.videos_seen = 0

    def is_done(self) -> bool:
        """No caption in progress."""
        return not self.state.live.any()

    def free_slots(self) -> int:
        return len(self.state.free)

    def slots_needed(self, opts: SearchOptions | None = None) -> int:
        """Slots one video with `opts` (default: the generator's) takes."""
        return (opts or self.opts).rows_per_video

    def videos_wanted(self) -> int:
        """How many videos with the generator's options to add now: as many as the free slots
        hold, once enough are free (`refill_threshold`) or when nothing runs; else 0."""
        free = len(self.state.free)
        wanted = refill_threshold(self.slots) if not self.is_done() else 1
        return free // self.per_video if free >= max(wanted, self.per_video) else 0

    def add(self, videos: Sequence[Video], prefix: np.ndarray | None = None) -> None:
        """Start captions for (key, pixels (F, 3, S, S)) or (key, pixels, SearchOptions) in free
        slots: one prefill for all. `prefix`, when given, is the videos' frame embeddings (k, F, E)
        as `encode_videos` returned them (encoded ahead: `EncodeAhead`), and their pixels are not
        read. ValueError when they need more slots than are free."""
        if not videos:
            return
        opts = [v[2] if len(v) > 2 else self.opts for v in videos]
        counts = np.array([o.rows_per_video for o in opts])
        free = self.state.free
        if counts.max() > self.slots or counts.sum() > len(free):
            raise ValueError(f"{len(videos)} videos need {counts.sum()} slots, {len(free)} are free "
                             f"(of {self.slots})")
        if prefix is None:
            pixels = stack_pixels(videos)  # (k, F, 3, S, S)
            self._check_frames(pixels.shape[1])  # before the encoder's work, not after
            prefix = encode_videos(self.backend, pixels)
        elif len(prefix) != len(videos):
            raise ValueError(f"{len(videos)} videos came with {len(prefix)} frame prefixes")
        self._check_frames(prefix.shape[1])
        rows = free[:counts.sum()]  # the lowest free slots: live rows stay packed at the front
        source = np.repeat(np.arange(len(videos)), counts)  # a video's rows share its prefix
        self.decoder.prefill(rows, prefix, source)
        self.state.begin(rows)
        for v, o, own in zip(videos, opts, np.split(rows, np.cumsum(counts)[:-1])):
            self._start(v[0], o, own, explicit=len(v) > 2)

    def _check_frames(self, frames: int) -> None:
        """The slot decoder, made for the first videos' frame count; ValueError for another one."""
        if self.decoder is None:
            self.decoder = make_slot_decoder(self.backend, self.slots, frames, self.state.max_new)
        elif frames != self.decoder.frame_num:
            raise ValueError(f"videos have {frames} frames, the first ones had {self.decoder.frame_num}")

    def _start(self, key: Any, opts: SearchOptions, rows: np.ndarray, explicit: bool) -> None:
        n = len(rows)
        video = _Video(key, opts, rows, np.full((n, self.state.max_new), self.state.pad, np.int64), n)
        if opts.uses_beams:
            video.beams = BeamSearch(opts, self.state.max_new, self.state.pad)
            self.beaming[id(video)] = video
        one_by_one = opts.do_sample or opts.adjusts_logits
        self.kind[rows] = BEAM if opts.uses_beams else ONE_BY_ONE if one_by_one else PLAIN
        for c, r in enumerate(rows):
            self.owner[r] = (video, c)
            self.rngs[r] = self._stream(opts, self.videos_seen, c, explicit)
        self.videos_seen += 1

    def generate_next_token(self) -> list[tuple[Any, np.ndarray]]:
        """Choose every running caption's next token, then run the decoder step that scores the
        one after; returns (key, token ids (n, T)) of the videos whose captions all ended."""
        finished = self._select()
        if not self.is_done():
            self._step()
        return finished

    def _stream(self, opts: SearchOptions, video: int, candidate: int,
                explicit: bool) -> np.random.Generator | None:
        if not opts.do_sample:
            return None
        if explicit and opts.seed is not None:
            return np.random.default_rng(np.random.SeedSequence(opts.seed, spawn_key=(candidate,)))
        return np.random.default_rng(np.random.SeedSequence(self.entropy, spawn_key=(video, candidate)))

    def _choose(self, rows: np.ndarray) -> np.ndarray:
        """Next token of each row of a greedy or sampled caption."""
        plain = self.kind[rows] == PLAIN
        chosen = np.empty(len(rows), np.int64)
        if plain.any():
            chosen[plain] = self.decoder.argmax(rows[plain])  # greedy rows: only their ids reach the host
        # Every other row by itself, from its own stream: the samples then do not depend on which
        # slot or batch a caption ran in.
        for i in np.flatnonzero(~plain):
            r = rows[i]
            opts = self.owner[r][0].opts
            logits = adjust_logits(self.decoder.logits(rows[i:i + 1]), self.state.tokens[r:r + 1],
                                   self.state.n_tokens[r:r + 1], opts)
            chosen[i] = select_tokens(logits, opts, self.rngs[r])[0]
        return chosen

    def _select(self) -> list[tuple[Any, np.ndarray]]:
        live = np.flatnonzero(self.state.live)
        in_beams = self.kind[live] == BEAM
        rows = live[~in_beams]
        finished = []
        for r in self.state.record(rows, self._choose(rows)):
            video, c = self.owner[r]
            video.candidates[c] = self.state.tokens[r]
            video.remaining -= 1
            if video.remaining == 0:
                # Greedy candidates are identical: one was decoded, and it stands for all of them.
                n = video.opts.num_return
                finished.append((video.key, np.repeat(video.candidates, n // len(video.candidates), axis=0)))
        finished += self._beam_step()
        return finished

    def _beam_step(self) -> list[tuple[Any, np.ndarray]]:
        """One step of every running beam search (videos with the same options together). The
        rows whose new beam continues another row take that row's cache columns and tokens
        (only those rows are copied); a video whose search ended frees its rows."""
        if not self.beaming:
            return []
        groups: dict[SearchOptions, list[_Video]] = {}
        for video in self.beaming.values():
            groups.setdefault(video.opts, []).append(video)
        finished, dst, src, going, tokens = [], [], [], [], []
        for videos in groups.values():
            own = np.stack([v.rows for v in videos])  # (n, K)
            parents, chosen = step_beams([v.beams for v in videos],
                                         self.decoder.logits(own.ravel()).reshape(*own.shape, -1))  # (n, K) each
            done = np.array([v.beams.done for v in videos])
            for video in (v for v, d in zip(videos, done) if d):
                self.state.live[video.rows] = False
                del self.beaming[id(video)]
                finished.append((video.key, video.beams.best(video.opts.num_return)))
            own, parents, chosen = own[~done], parents[~done], chosen[~done]
            moved = parents != np.arange(own.shape[1])
            dst.append(own[moved])
            src.append(np.take_along_axis(own, parents, 1)[moved])
            going.append(own.ravel())
            tokens.append(chosen.ravel())
        dst, src = np.concatenate(dst), np.concatenate(src)
        if len(dst):
            self.decoder.copy_rows(dst, src)
            self.state.copy_rows(dst, src)
        # Beams never end here: [PAD] and the length limit end the search instead.
        self.state.record(np.concatenate(going), np.concatenate(tokens))
        return finished

    def _step(self) -> None:
        """One token for every live caption."""
        self.decoder.step(self.state.last_tokens(), self.state.live)


def make_slot_decoder(backend: Backend, slots: int, frame_num: int, max_new_tokens: int) -> SlotDecoder:
    """The backend's own slot decoder where it has one (torch-fast), else the fixed-length cache
    bound to its prefill and decode graphs, in the memory they run in."""
    make = getattr(backend, "slot_decoder", None)
    if make is not None:
        return make(slots, frame_num, max_new_tokens)
    return BoundSlotDecoder(backend, slots, frame_num, max_new_tokens)


def stream_captions(backend: Backend, videos: Iterable[tuple[Any, np.ndarray]], opts: SearchOptions,
                    max_new_tokens: int, slots: int = 8,
                    seed: int | None = None) -> Iterator[tuple[Any, np.ndarray]]:
    """(key, pixels (F, 3, S, S) uint8 crops) pairs → (key, token ids (num_return, T)) in the
    order captions finish, pad_id after each caption's end. Videos are read only as slots free up
    (or, where the backend encodes ahead, a refill or two before), so a lazy iterable keeps memory
    flat. ``seed`` keys the sampling streams (None: fresh)."""
    gen = CaptionGenerator(backend, opts, max_new_tokens, slots, seed)
    feed = EncodeAhead(backend, videos, gen.slots // gen.per_video)
    try:
        while True:
            wanted = 0 if feed.exhausted else gen.videos_wanted()
            if wanted:
                gen.add(*feed.take(wanted))
            if gen.is_done() and feed.exhausted:
                return
            yield from gen.generate_next_token()
    finally:
        feed.close()


class EncodeAhead:
    """The videos a generator's refills take, read from an iterable, with their frames encoded.

    Where the backend's encoder runs on a device (``encodes_ahead``), the next refills' videos
    are read and encoded before they are asked for, while the generator decodes: the device has
    the encoder's work queued while the host does the decoder's bookkeeping between steps, and
    stacking and copying the next frames overlaps both. Two batches are encoded at once, by two
    threads, so one's host work overlaps the other's device work and the device never waits for
    the next batch's frames. A batch is what a full refill takes (`batch` videos); reading happens
    here, in the caller's thread, since the iterable may not be safe to read from another one.
    The first batch is encoded in the caller's thread, alone, and encoding ahead begins at the
    next refill: the first captions wait for no other rows.
    Elsewhere (the CPU) the encoder and the decoder run on the same cores: the videos are read
    when asked for and encoded in the refill (`take` returns no prefix)."""

    IN_FLIGHT = 2  # batches encoding at once, each on its own thread

    def __init__(self, backend: Backend, videos: Iterable[Video], batch: int):
        self.backend, self.videos, self.batch = backend, iter(videos), max(1, batch)
        self.ahead = bool(getattr(backend, "encodes_ahead", False))
        self.pool = ThreadPoolExecutor(self.IN_FLIGHT, thread_name_prefix="v2t-encode") if self.ahead else None
        self.pending: deque[Future] = deque()  # batches encoding, in input order
        self.ready: list[Video] = []  # videos encoded, not yet taken (pixels dropped)
        self.prefix: np.ndarray | None = None  # their frame embeddings
        self.read_all = False
        self.started = False  # the first batch was taken: from then on, IN_FLIGHT are kept encoding

    @property
    def exhausted(self) -> bool:
        """Every video was taken."""
        return self.read_all and not self.ready and not self.pending

    def take(self, n: int) -> tuple[list[Video], np.ndarray | None]:
        """Up to `n` videos and their prefix (None: the generator encodes them), fewer only
        once the iterable ends. Encoding ahead, it waits for batches still encoding."""
        if not self.ahead:
            videos = list(islice(self.videos, n))
            self.read_all = len(videos) < n
            return videos, None
        if self.started:
            self._fill()
        while len(self.ready) < n and (self.pending or not self.read_all):
            if not self.pending:
                # The first batch, in this thread (a compile runs here), and nothing else yet: its
                # captions start without waiting for more rows to be decoded and encoded.
                self._read_batch(inline=True)
                continue
            videos, prefix = self.pending.popleft().result()
            self.ready += videos
            self.prefix = prefix if self.prefix is None or not len(self.prefix) else np.concatenate([self.prefix, prefix])
            if self.started:
                self._fill()
        self.started = True
        if not self.ready:
            return [], None
        videos, self.ready = self.ready[:n], self.ready[n:]
        prefix, self.prefix = self.prefix[:len(videos)], self.prefix[len(videos):]
        return videos, prefix

    def _fill(self) -> None:
        while len(self.pending) < self.IN_FLIGHT and not self.read_all:
            self._read_batch()

    def _read_batch(self, inline: bool = False) -> None:
        videos = list(islice(self.videos, self.batch))
        self.read_all = len(videos) < self.batch
        if not videos:
            return
        future: Future = Future()
        if inline:
            future.set_result(_encoded(self.backend, videos))
        else:
            future = self.pool.submit(_encoded, self.backend, videos)
        self.pending.append(future)

    def close(self) -> None:
        """Stops encoding ahead (batches not started are dropped) and waits for the rest."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _encoded(backend: Backend, videos: list[Video]) -> tuple[list[Video], np.ndarray]:
    """The videos without their pixels, and their frame embeddings."""
    prefix = encode_videos(backend, stack_pixels(videos))
    return [(v[0], None, *v[2:]) for v in videos], prefix


def generate_candidates(backend: Backend, pixels: np.ndarray, opts: SearchOptions,
                        rng: np.random.Generator, max_new_tokens: int) -> np.ndarray:
    """pixels (B, F, 3, S, S) → token ids (B, num_return, max_new_tokens), one slot per caption."""
    B = pixels.shape[0]
    n = opts.rows_per_video
    out = np.full((B, opts.num_return, max_new_tokens), backend.config.pad_id, np.int64)
    seed = int(rng.integers(2 ** 63)) if opts.do_sample else None
    for i, candidates in stream_captions(backend, enumerate(pixels), opts, max_new_tokens,
                                         slots=max(1, B * n), seed=seed):
        out[i] = candidates
    return out


"""One running caption generator shared by many callers: the embedding API of `v2t serve`.

    from v2t_engine.serve import CaptionService
    with CaptionService.load("export_dir", slots=8, max_queue=64) as service:
        pixels = service.decode_frames(base64_frames)      # uint8 crops, as a table row's frames
        captions = service.submit(pixels).result()         # from any thread
        captions = await service.caption(pixels)           # or from a coroutine

A single engine thread owns the generator and the backend. Callers put requests into a bounded
queue and get a future back; the engine moves queued requests into the free slots of the running
batch (continuous batching: a request waits for a slot, never for a whole batch to finish), runs
one decoder step for every running caption at a time, and resolves each request's future when its
captions end. A full queue refuses new requests at once (ServiceOverloaded) instead of letting
waits grow without bound; `close` stops taking requests and finishes those already taken.

Frames are decoded by the caller (or its worker pool), before a request enters the queue, so a
bad image fails that request alone and the engine thread never waits on JPEG decoding.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ServiceClosed, ServiceOverloaded
from ..inputs.frames import FrameSource, load_row_frames
from ..runtime.captioner import Captioner
from ..runtime.generator import CaptionGenerator, refill_threshold
from ..runtime.search import SearchOptions

log = logging.getLogger(__name__)


@dataclass
class ServiceStats:
    """What the service has done so far (counters) and holds now (gauges)."""
    slots: int
    queued: int = 0  # requests waiting for a slot
    running: int = 0  # requests whose captions are being generated
    busy_slots: int = 0  # decoder rows in use at the last step
    submitted: int = 0
    completed: int = 0
    failed: int = 0  # requests the engine failed (a backend error), not refused ones
    cancelled: int = 0  # given up by their caller while queued
    refused: int = 0  # ServiceOverloaded
    steps: int = 0  # decoder steps
    busy_slot_steps: int = 0  # sum over steps of the rows in use: / (steps * slots) = occupancy
    prefills: int = 0  # prefill calls (a batch of requests entering slots)


@dataclass(eq=False)  # hashed by identity: the engine keeps a set of running requests
class _Request:
    pixels: np.ndarray  # (F, 3, S, S) uint8 crops
    opts: SearchOptions
    future: Future = field(default_factory=Future)


class CaptionService:
    """Thread-safe, asyncio-friendly captioning of single videos over one continuous batch."""

    def __init__(self, captioner: Captioner, slots: int = 8, max_queue: int = 64,
                 text_len: int | None = None):
        if slots < 1 or max_queue < 1:
            raise ConfigError(f"slots and max_queue must be at least 1, got slots={slots}, max_queue={max_queue}")
        self.captioner = captioner
        self.config = captioner.config
        self.slots, self.max_queue = slots, max_queue
        self.max_new_tokens = captioner.max_new_tokens(text_len)
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._stats = ServiceStats(slots=slots)
        self._gen = self._new_generator()
        self._active: set[_Request] = set()
        self._engine = threading.Thread(target=self._run, name="v2t-caption-engine", daemon=True)
        self._engine.start()

    @classmethod
    def load(cls, path: str | Path, slots: int = 8, max_queue: int = 64, text_len: int | None = None,
             backend: str = "auto", device: str = "cpu", threads: int | None = None,
             verify: bool = False) -> "CaptionService":
        """A service over `Captioner.load(path, ...)`."""
        return cls(Captioner.load(path, backend, device, threads, verify), slots, max_queue, text_len)

    # ------------------------------------------------------------------ caller side (any thread)
    def decode_frames(self, frames: Sequence[str], source: FrameSource = FrameSource()) -> np.ndarray:
        """Base64 frames → uint8 crops (frame_num, 3, S, S), decoded exactly as a
        table row's frames field is (the first frame_num frames; a shorter list repeats its last
        frame). FrameError names the frame and the reason."""
        field = json.dumps(list(frames))  # the frames field a table row would hold
        crops, _ = load_row_frames(field, self.config.frame_num, self.config.img_size, source)
        return crops

    def submit(self, pixels: np.ndarray, opts: SearchOptions | None = None) -> Future:
        """Queue one video: pixels (frame_num, 3, S, S), uint8 crops (`decode_frames`; the backend
        normalizes them). The future's result is its list of
        opts.num_return captions. ServiceOverloaded when the queue is full,
        ServiceClosed once `close` was called. Cancelling the future while it is queued
        withdraws the request."""
        opts = opts or SearchOptions()
        self._check(pixels, opts)
        request = _Request(np.ascontiguousarray(pixels), opts)
        with self._cond:
            if self._closing:
                raise ServiceClosed("the caption service is shutting down")
            if len(self._queue) >= self.max_queue:
                self._stats.refused += 1
                raise ServiceOverloaded(f"the request queue is full ({self.max_queue} waiting)")
            self._queue.append(request)
            self._stats.submitted += 1
            self._cond.notify()
        return request.future

    async def caption(self, pixels: np.ndarray, opts: SearchOptions | None = None,
                      timeout: float | None = None) -> list[str]:
        """`submit` for coroutines: awaits the captions without blocking the event loop.
        asyncio.TimeoutError after `timeout` seconds (the request is withdrawn if still queued)."""
        future = self.submit(pixels, opts)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            future.cancel()  # effective only while queued: a running caption finishes unseen
            raise

    def stats(self) -> ServiceStats:
        with self._cond:
            return replace(self._stats, queued=len(self._queue))

    @property
    def accepting(self) -> bool:
        return not self._closing and self._engine.is_alive()

    def close(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Take no new requests; with `drain`, finish the queued and running ones first (up to
        `timeout` seconds), otherwise fail the queued ones with ServiceClosed. True when the
        engine thread has stopped."""
        with self._cond:
            self._closing = True
            if not drain:
                self._fail_queued(ServiceClosed("the caption service closed before this request ran"))
            self._cond.notify_all()
        self._engine.join(timeout)
        return not self._engine.is_alive()

    def __enter__(self) -> "CaptionService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, pixels: np.ndarray, opts: SearchOptions) -> None:
        cfg = self.config
        want = (cfg.frame_num, 3, cfg.img_size, cfg.img_size)
        if tuple(pixels.shape) != want:
            raise ConfigError(f"pixels have shape {tuple(pixels.shape)}, this model takes {want}")
        if pixels.dtype != np.uint8:
            raise ConfigError(f"pixels are {pixels.dtype}; the service takes uint8 crops (decode_frames), which "
                              "the model normalizes itself")
        if self._gen.slots_needed(opts) > self.slots:
            raise ConfigError(f"these search options take {self._gen.slots_needed(opts)} decoder slots a video, "
                              f"the service has {self.slots}")

    # ------------------------------------------------------------------ engine thread
    def _new_generator(self) -> CaptionGenerator:
        return CaptionGenerator(self.captioner.backend, SearchOptions(), self.max_new_tokens, self.slots)

    def _run(self) -> None:
        while True:
            batch = self._take(wait=self._gen.is_done())
            if batch is None:
                return
            try:
                self._advance(batch)
            except Exception as err:  # noqa: BLE001 - a backend failure fails its requests, not the service
                log.exception("caption engine failed; failing %d running requests", len(self._active))
                self._fail_active(err)

    def _take(self, wait: bool) -> list[_Request] | None:
        """Queued requests for the free slots (blocking while idle); None when closed and idle."""
        with self._cond:
            while wait and not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            return self._fill_free_slots()

    def _fill_free_slots(self) -> list[_Request]:
        """Queued requests, first come first served, for the free slots: all that fit when idle;
        while captions run, only once refill_threshold slots are free (a prefill costs about one
        decoder step whatever its size, so refilling one slot at a time would waste steps)."""
        gen, taken = self._gen, []
        free = gen.free_slots()
        if not gen.is_done() and free < refill_threshold(self.slots):
            return taken
        while self._queue and gen.slots_needed(self._queue[0].opts) <= free:
            request = self._queue.popleft()
            if request.future.set_running_or_notify_cancel():
                taken.append(request)
                free -= gen.slots_needed(request.opts)
            else:
                self._stats.cancelled += 1
        return taken

    def _advance(self, batch: list[_Request]) -> None:
        gen = self._gen
        if batch:
            self._active.update(batch)
            gen.add([(request, request.pixels, request.opts) for request in batch])
            self._stats.prefills += 1
        if gen.is_done():
            return
        busy = int(gen.state.live.sum())
        finished = gen.generate_next_token()
        with self._cond:
            self._stats.steps += 1
            self._stats.busy_slot_steps += busy
            self._stats.busy_slots = busy
            self._stats.running = len(self._active)
        for request, ids in finished:
            self._active.discard(request)
            captions = self.captioner.decode_candidates(ids)
            request.future.set_result(captions)
            with self._cond:
                self._stats.completed += 1
                self._stats.running = len(self._active)
                self._stats.busy_slots = int(gen.state.live.sum())

    def _fail_active(self, err: Exception) -> None:
        for request in self._active:
            request.future.set_exception(err)
        with self._cond:
            self._stats.failed += len(self._active)
            self._stats.running = self._stats.busy_slots = 0
        self._active.clear()
        self._gen = self._new_generator()  # its slots may hold half a step

    def _fail_queued(self, err: Exception) -> None:
        while self._queue:
            request = self._queue.popleft()
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(err)

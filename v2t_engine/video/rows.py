"""Videos → EasyNLP table rows, decoded in worker processes, in input order.

`v2t make-table` writes these rows, and `v2t predict --videos` captions the very same rows
without writing them, so both give the same captions by construction: one function makes the
frames field (decode.py), and the normal frame decoding reads it either way.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

from ..concurrency import in_order, worker_context
from ..errors import RowError
from ..inputs.tables import FRAMES_COLUMN, IDX_COLUMN, TableRow
from .decode import EncodedFrames, Failure, FrameOptions, frames_or_failure
from .inputs import VideoInput, iter_inputs, printable

log = logging.getLogger(__name__)

# What a video worker imports, loaded once into the forkserver instead of in every worker.
_WORKER_PRELOAD = ("av", "PIL.Image", "v2t_engine.video.decode")


class _Pools:
    """A pool of `workers` processes, plus a one-process pool to retry alone the inputs that were
    in flight when a worker died (a native crash in a decoder, or a kill for memory): only the
    input that kills a process on its own is blamed."""

    def __init__(self, workers: int):
        self.workers = workers
        self.main = self._new(workers)
        self.solo: ProcessPoolExecutor | None = None

    @staticmethod
    def _new(workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=worker_context(_WORKER_PRELOAD))

    def submit(self, fn: Callable, item) -> tuple[ProcessPoolExecutor, Future]:
        try:
            return self.main, self.main.submit(fn, item)
        except BrokenProcessPool:
            self._replace(self.main)
            return self.main, self.main.submit(fn, item)

    def result(self, pool: ProcessPoolExecutor, future: Future, fn: Callable, item, on_crash: Callable):
        try:
            return future.result()
        except BrokenProcessPool:
            self._replace(pool)
            return self._alone(fn, item, on_crash)

    def _alone(self, fn: Callable, item, on_crash: Callable):
        self.solo = self.solo or self._new(1)
        try:
            return self.solo.submit(fn, item).result()
        except BrokenProcessPool:
            self.solo.shutdown(wait=False)
            self.solo = None
            return on_crash(item)

    def _replace(self, pool: ProcessPoolExecutor) -> None:
        if pool is self.main:
            pool.shutdown(wait=False, cancel_futures=True)
            self.main = self._new(self.workers)

    def close(self) -> None:
        for pool in (self.main, self.solo):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def ordered_map(fn: Callable, items: Iterable, workers: int, on_crash: Callable,
                window: int | None = None) -> Iterator[tuple]:
    """(item, fn(item)) for every item, computed in `workers` processes and yielded in input
    order. At most `window` items are in flight, so a list of a million files is read as it is
    consumed and memory stays flat. `fn` must be picklable and should not raise; an item whose
    worker dies gets `on_crash(item)` as its result."""
    pools = _Pools(workers)
    try:
        yield from in_order(items, lambda item: pools.submit(fn, item),
                            lambda item, handle: pools.result(*handle, fn, item, on_crash),
                            window or 4 * workers)
    finally:
        pools.close()


def _crashed(item: VideoInput) -> Failure:
    return Failure("the decoding process died on this file (a crash in FFmpeg, or out of memory)")


class VideoRows:
    """The rows `--videos` gives, in input order: a TableRow (``idx`` and the frames column, a
    JSON list of base64 images, as a table holds it) or a RowError (line = the input's position,
    idx, and the reason naming the file). Iterate once."""

    def __init__(self, spec: str, opts: FrameOptions, column: str = FRAMES_COLUMN, workers: int = 2,
                 idx_style: str = "path"):
        self.inputs = iter_inputs(spec, idx_style)  # checks the arguments now, not at first next()
        self.opts = opts
        self.column = column
        self.workers = workers
        self.short = 0  # videos with fewer frames than asked for

    def __iter__(self) -> Iterator[TableRow | RowError]:
        work = partial(frames_or_failure, opts=self.opts)
        for item, result in ordered_map(work, self.inputs, self.workers, _crashed):
            yield self._row(item, result)
        if self.short:
            log.warning("%d videos had fewer than %d frames: some of their frames repeat",
                        self.short, self.opts.count)

    def _row(self, item: VideoInput, result: EncodedFrames | Failure) -> TableRow | RowError:
        if isinstance(result, Failure):
            where = "" if item.path == item.idx else f"{printable(item.path)}: "
            return RowError(item.ordinal, item.idx, where + result.reason)
        count = self.opts.count
        self.short += count is not None and result.available < count
        frames = json.dumps(result.frames, separators=(",", ":"))
        return TableRow(item.ordinal, {IDX_COLUMN: item.idx, self.column: frames})

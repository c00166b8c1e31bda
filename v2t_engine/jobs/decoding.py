"""predict's frame decoding: each row's frames field → its uint8 crops (or its RowError), ahead of
the model, in threads or in worker processes, handed back in input order.

Worker processes hand their crops back through shared memory (`CropSlots`), not through the
pool's result pipe. A full-size row's crops are 602 KB. Pickled through the pipe, the job's
process pays for the pipe's reads and two copies under the GIL, and the thread that drives the
model waits for the GIL. Through a slot it pays for one copy. `benchmarks/bench_input.py`
measures both transports.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from .. import concurrency
from ..config import ModelConfig
from ..concurrency import available_cores, worker_pool
from ..errors import RowError
from ..inputs.frames import FrameSource, row_frames_or_error
from ..inputs.table_ranges import PlacedRow
from ..inputs.tables import TableRow

if TYPE_CHECKING:
    from .predict import PredictOptions


@dataclass
class Decoded:
    """A row's frames, decoded: what a decode worker sends back (the row stays with the caller)."""
    pixels: np.ndarray | None = None  # uint8 (F, 3, S, S)
    padded: int = 0
    error: RowError | None = None
    placed: PlacedRow | None = None  # set by the caller
    slot: int | None = None  # the CropSlots slot holding the pixels, while they cross processes

    def __reduce__(self):
        # RowError takes (line_no, idx, reason) but pickles, as exceptions do, as its message
        # alone, which it cannot be rebuilt from: a worker process sends the three fields.
        err = self.error
        fields = None if err is None else (err.line_no, err.idx, err.reason)
        return _unpickle_decoded, (self.pixels, self.padded, fields, self.placed, self.slot)


def _unpickle_decoded(pixels, padded, error, placed, slot=None) -> Decoded:
    return Decoded(pixels, padded, None if error is None else RowError(*error), placed, slot)


@dataclass(frozen=True)
class FrameDecoder:
    """A row's frames field → its uint8 crops (or its RowError), as predict decodes them. A
    top-level class holding only options, so it pickles: worker processes run it as well as
    threads."""
    column: str
    frame_num: int
    img_size: int
    source: FrameSource = field(default_factory=FrameSource)

    @classmethod
    def for_job(cls, opts: "PredictOptions", cfg: ModelConfig) -> "FrameDecoder":
        return cls(opts.first_sequence, opts.frame_num or cfg.frame_num, cfg.img_size, opts.frame_source)

    @property
    def crop_shape(self) -> tuple[int, int, int, int]:
        return (self.frame_num, 3, self.img_size, self.img_size)

    def __call__(self, item: TableRow | RowError) -> Decoded:
        if isinstance(item, RowError):
            return Decoded(error=item)
        try:
            return Decoded(*row_frames_or_error(item, self.column, self.frame_num, self.img_size, self.source))
        except RowError as err:
            return Decoded(error=err)


def decode_processes(requested: int | None) -> int:
    """How many processes decode frames (0: threads do): `requested` (predict's
    --decode_processes), else, where there are more than 2 cores, one per core but one (left to
    the thread that drives the model), else 0.

    Decoding a frame holds the GIL for at least a fifth of its time (base64, PIL's header parsing,
    the array copy out of PIL; JPEG decoding and resizing release it), so threads cannot use more
    than a few cores however many there are, and what they hold delays the thread that drives the
    model; processes scale with the cores. On 2 cores processes measured no faster than threads (the
    model runs on the same cores; README, "Benchmarks"), and a pool takes about 0.6 s to start.
    Python callers of predict_tables on such machines need the `if __name__ == "__main__":` guard
    that any multiprocessing needs: the workers import the caller's main module."""
    if requested is not None:
        return requested
    cores = available_cores()
    return cores - 1 if cores > 2 else 0


class CropSlots:
    """`count` buffers of one row's crops, shared by the job's process and its decode workers.

    A worker takes a free slot, writes its row's crops there and sends back the slot's number;
    the job's process copies the crops out as the result arrives (not when the consumer gets to
    the row: results finish out of order, and a slot held until then could leave every worker
    waiting on a row no worker is decoding) and frees the slot. So a slot is held only while a
    worker writes it and its number crosses the pipe: a few more slots than workers never run out.

    The memory is multiprocessing's shared heap: /dev/shm where it has room (it is small in some
    containers), else a file in the temporary directory, which the page cache serves alike. A
    CropSlots pickles only while worker processes start (it goes to them as an initializer
    argument), as the file descriptor and the queue it holds must."""

    def __init__(self, count: int, shape: tuple[int, ...], ctx=None):
        ctx = ctx or multiprocessing.get_context()
        self.count, self.shape = count, tuple(shape)
        self._raw = ctx.RawArray("B", count * int(np.prod(self.shape)))
        self._free = ctx.SimpleQueue()
        for i in range(count):
            self._free.put(i)
        self._view = None

    def __getstate__(self):
        return {"count": self.count, "shape": self.shape, "_raw": self._raw, "_free": self._free}

    def __setstate__(self, state):
        self.__dict__.update(state, _view=None)

    def _slots(self) -> np.ndarray:
        if self._view is None:
            self._view = np.frombuffer(self._raw, np.uint8).reshape(self.count, *self.shape)
        return self._view

    def put(self, crops: np.ndarray) -> int:
        """(In a worker.) Writes `crops` to a free slot, waiting for one; returns its number."""
        slot = self._free.get()
        self._slots()[slot] = crops
        return slot

    def take(self, slot: int) -> np.ndarray:
        """(In the job's process.) A copy of `slot`'s crops; the slot is free again."""
        crops = self._slots()[slot].copy()
        self._free.put(slot)
        return crops


_WORKER_SLOTS: CropSlots | None = None


def _attach_slots(slots: CropSlots) -> None:
    """Initializer of a decode worker: the slots it writes crops to."""
    global _WORKER_SLOTS
    _WORKER_SLOTS = slots


def _decode_into_slots(decode: FrameDecoder, items: list[TableRow]) -> list[Decoded]:
    """(In a worker.) `decode` of each item, their crops sent through slots where they fit one."""
    decoded = [decode(item) for item in items]
    slots = _WORKER_SLOTS
    for d in decoded:
        if d.pixels is not None and slots is not None and d.pixels.dtype == np.uint8 and d.pixels.shape == slots.shape:
            d.slot, d.pixels = slots.put(d.pixels), None
    return decoded


def _decode_all(decode: FrameDecoder, items: list[TableRow]) -> list[Decoded]:
    return [decode(item) for item in items]


def rows_per_task(window: int, processes: int) -> int:
    """How many rows a decode process gets at a time: up to 8, which halves what the job's process
    spends per row on tasks (bench_input.py), but few enough that each process has four tasks in a
    read-ahead `window`, so a small job is still spread over every process."""
    return max(1, min(8, window // (4 * max(processes, 1))))


# What a decode worker imports, loaded once into the forkserver instead of in every worker.
_WORKER_PRELOAD = ("numpy", "PIL.Image", __name__)


# What the slots of a DecodePool may take, in bytes, where a row per task fits.
SLOT_MEMORY = 256 << 20


class DecodePool:
    """Where rows are decoded: `processes` worker processes (`concurrency.worker_pool`), given
    `chunk` rows per task, whose crops come back through CropSlots of `crop_shape`, or, with
    processes 0, `threads` threads, a row per task. A context manager: leaving it drops the rows
    queued but not started, which the job no longer needs once it ended, stopped or failed."""

    def __init__(self, processes: int, threads: int, crop_shape: tuple[int, ...], chunk: int = 1):
        self.workers = processes or threads
        self.chunk = 1
        self.slots: CropSlots | None = None
        self.executor: Executor
        if processes:
            # A worker holds a task's slots until its result crosses the pipe: twice as many
            # tasks' worth as workers means none waits for a slot, and at least one task's worth
            # per worker means none can wait forever. Large crops get fewer rows per task, so
            # the slots stay within SLOT_MEMORY (but for one row per task).
            tasks, row_bytes = 2 * processes + 2, int(np.prod(crop_shape))
            self.chunk = max(1, min(chunk, SLOT_MEMORY // (tasks * row_bytes)))
            self.slots = CropSlots(tasks * self.chunk, crop_shape, concurrency.worker_context(_WORKER_PRELOAD))
            self.executor = worker_pool(processes, _WORKER_PRELOAD, init=(_attach_slots, (self.slots,)))
        else:
            self.executor = ThreadPoolExecutor(threads)

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, decode: FrameDecoder, items: list[TableRow]) -> Future:
        """A Future of `[decode(item) for item in items]`, their pixels in the job's own memory
        once it is done."""
        if self.slots is None:
            return self.executor.submit(_decode_all, decode, items)
        ours: Future = Future()
        self.executor.submit(_decode_into_slots, decode, items).add_done_callback(partial(self._claim, ours))
        return ours

    def _claim(self, ours: Future, theirs: Future) -> None:
        # Runs in the pool's result thread as each result arrives, whatever its order.
        if theirs.cancelled():
            ours.cancel()
            return
        try:
            decoded = theirs.result()
            for d in decoded:
                if d.slot is not None:
                    d.pixels, d.slot = self.slots.take(d.slot), None
        except BaseException as err:  # a broken pool, above all: the job reports it
            ours.set_exception(err)
        else:
            ours.set_result(decoded)


def decoded_rows(pool: DecodePool, decode: FrameDecoder, source: Iterable[PlacedRow],
                 window: int) -> Iterator[Decoded]:
    """The rows of `source` with their frames decoded in `pool`, `pool.chunk` rows per task, at
    most about `window` rows ahead of the consumer, in input order. A worker is sent the rows
    alone (not their places), and no line the reader already found bad."""
    def submit(chunk: list[PlacedRow]) -> Future:
        rows = [p.item for p in chunk if not isinstance(p.item, RowError)]
        if not rows:
            done: Future = Future()
            done.set_result([])
            return done
        return pool.submit(decode, rows)

    def collect(chunk: list[PlacedRow], future: Future) -> list[Decoded]:
        decoded = iter(future.result())
        return [Decoded(error=p.item) if isinstance(p.item, RowError) else next(decoded) for p in chunk]

    tasks = concurrency.chunks(source, pool.chunk)
    for chunk, decoded in concurrency.in_order(tasks, submit, collect, max(1, window // pool.chunk)):
        for placed, d in zip(chunk, decoded):
            d.placed = placed
            yield d

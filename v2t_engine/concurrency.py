"""Work done ahead of its consumer, in input order, and the cores there are to do it with.

Frames are decoded in threads (training's cached datasets, predict on few cores) or in processes
(predict on many cores: `worker_pool`), and videos in processes (make-table, predict --videos);
every one of those readers streams inputs of any length, so each keeps a bounded window of work
in flight and hands results back in input order.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from itertools import islice
from typing import TypeVar

T = TypeVar("T")
H = TypeVar("H")
R = TypeVar("R")


def in_order(items: Iterable[T], submit: Callable[[T], H], collect: Callable[[T, H], R],
             window: int) -> Iterator[tuple[T, R]]:
    """(item, collect(item, submit(item))) for every item, in input order. At most `window`
    items are submitted and not yet collected, so an input of any length is read only as fast as
    it is consumed. `submit` starts the work (returns a handle, e.g. a Future); `collect` waits
    for it."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    pending: deque[tuple[T, H]] = deque()
    for item in items:
        pending.append((item, submit(item)))
        if len(pending) >= window:
            first, handle = pending.popleft()
            yield first, collect(first, handle)
    while pending:
        first, handle = pending.popleft()
        yield first, collect(first, handle)


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last may be shorter), read as they are consumed."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def map_ahead(pool: Executor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """fn(item) for every item, computed in `pool` while the consumer works on earlier results,
    in input order, at most `window` in flight (Executor.map would read the whole input first)."""
    for _, result in in_order(items, lambda item: pool.submit(fn, item),
                              lambda _item, future: future.result(), window):
        yield result


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cgroup cpusets), where the
    system reports one, else every core."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


# How often a worker process checks that the process that started it is still alive.
PARENT_POLL_S = 1.0


def worker_context(preload: Sequence[str] = ()) -> multiprocessing.context.BaseContext:
    """How worker processes start: forkserver where there is one, preloading the modules named in
    `preload` (no effect once the server runs: only a speed-up), else spawn. Never as a fork of a
    parent that already runs ONNX Runtime threads: forking threads can deadlock. So what workers
    run must be picklable: top-level functions, or objects of top-level classes."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        if preload:
            ctx.set_forkserver_preload(list(preload))
        return ctx
    return multiprocessing.get_context("spawn")


def worker_pool(workers: int, preload: Sequence[str] = (),
                init: tuple[Callable, tuple] | None = None) -> ProcessPoolExecutor:
    """A pool of `workers` processes (started as `worker_context(preload)` says) for work
    submitted by a job that handles its own SIGINT and SIGTERM (predict drains: it finishes the
    rows in flight, which needs its workers). `init`, (function, args), runs in each worker as it
    starts.

    The workers ignore SIGINT and SIGTERM (`ignore_stop_signals`): a Ctrl-C reaches every
    process of the terminal's process group, and a worker it killed would turn the parent's clean
    stop into a broken pool. Since they ignore those signals, they leave by themselves once the
    parent is gone (killed with SIGKILL, say), instead of waiting forever for work."""
    return ProcessPoolExecutor(workers, mp_context=worker_context(preload), initializer=_start_worker,
                               initargs=(os.getpid(), init))


def _start_worker(parent: int, init: tuple[Callable, tuple] | None) -> None:
    ignore_stop_signals(parent)
    if init is not None:
        fn, args = init
        fn(*args)


def ignore_stop_signals(parent: int | None = None) -> None:
    """Initializer of worker processes: SIGINT and SIGTERM ignored (the parent decides when the
    work stops), and, given the parent's pid, an exit once that process is gone."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if parent is not None:
        threading.Thread(target=_exit_after, args=(parent,), name="v2t-parent-watch", daemon=True).start()


def _exit_after(parent: int) -> None:
    # Not getppid(): a forkserver's workers are the server's children, and the server outlives
    # the job's process.
    while True:
        time.sleep(PARENT_POLL_S)
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            pass  # it exists (a pid reused by another user's process would keep us: harmless)

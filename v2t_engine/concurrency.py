"""Work done ahead of its consumer, in input order, and the cores there are to do it with.

Frames are decoded in threads (predict, training's cached datasets) and videos in processes
(make-table, predict --videos); every one of those readers streams inputs of any length, so each
keeps a bounded window of work in flight and hands results back in input order.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
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

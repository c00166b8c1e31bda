"""predict's input pipeline alone: how fast decoded rows reach the model, and what that costs the
job's own process, whose GIL the thread that drives the model needs.

A table of 320x240 JPEG clips at the seed's full size (4 frames, 224 px crops) is decoded the way
`v2t predict` decodes it (`jobs.decoding.decoded_rows`, its read-ahead window) and consumed by a
loop that does nothing else, so the rows/s is the most the input side can feed a model. Methods:

- threads: `--workers` threads in the job's process (predict's default on 2 cores);
- processes, pickled crops: worker processes whose crops come back pickled through the pool's
  result pipe (v2t before shared-memory slots; the baseline);
- processes, shared memory: what predict does now (`jobs.decoding.CropSlots`).

"job CPU" is the job's process's CPU time (every thread of it) per row: the part of decoding a
GPU host's model-driving thread competes with. Each method runs --repeats times; the median run
(by rows/s) is reported.

    python benchmarks/bench_input.py                 # 2,048 rows, processes = cores - 1
    python benchmarks/bench_input.py --processes 15  # a 16-core GPU host
    python benchmarks/bench_input.py --tiny          # checks the script in seconds
"""
from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from itertools import islice, product
from pathlib import Path

import numpy as np

from v2t_engine.concurrency import available_cores, worker_pool
from v2t_engine.inputs.table_ranges import read_tables
from v2t_engine.inputs.tables import InputSchema
from v2t_engine.jobs.decoding import _WORKER_PRELOAD, DecodePool, FrameDecoder, _decode_all, decoded_rows, rows_per_task
from v2t_engine.jobs.synth import COLOURS, MOTIONS, SHAPES, encode_frames, make_clip

SEED = 0
# Every kind of synthetic clip, so rows differ as a real table's do.
KINDS = list(product(COLOURS, SHAPES, MOTIONS))
SCHEMA = InputSchema.parse("idx:str:1,imgbase64:str:1")


def clip_field(i: int, frame_num: int, size: tuple[int, int]) -> str:
    """Row i's frames field: one of KINDS' clips, drawn from its own seed."""
    colour, shape, motion = KINDS[i % len(KINDS)]
    return encode_frames(make_clip(np.random.default_rng([SEED, i]), colour, shape, motion,
                                   frames=frame_num, size=size))


def write_table(path: Path, rows: int, distinct: int, frame_num: int, size: tuple[int, int]) -> Path:
    """`rows` rows repeating `distinct` clips, JPEG-encoded in forked processes."""
    with ProcessPoolExecutor(available_cores(), mp_context=multiprocessing.get_context("fork")) as pool:
        fields = list(pool.map(partial(clip_field, frame_num=frame_num, size=size), range(distinct), chunksize=8))
    path.write_text("".join(f"v{i:06d}\t{fields[i % distinct]}\n" for i in range(rows)), encoding="utf-8")
    return path


class PickledPool:
    """Worker processes, a row per task, whose crops come back pickled through the result pipe:
    v2t's transport before CropSlots, kept here as the baseline."""
    chunk = 1

    def __init__(self, processes: int):
        self.workers = processes
        self.executor = worker_pool(processes, _WORKER_PRELOAD)

    def __enter__(self) -> "PickledPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, decode: FrameDecoder, items: list) -> Future:
        return self.executor.submit(_decode_all, decode, items)


def run(pool, decode: FrameDecoder, table: Path, window: int) -> tuple[float, float, int]:
    """(rows/s, job CPU s per row, rows) of one pass over the table."""
    placed = islice(read_tables([str(table)], SCHEMA, 1 << 24), 2 * pool.workers)
    for f in [pool.submit(decode, [p.item]) for p in placed]:  # the workers have started and imported what they need
        f.result()
    rows = 0
    began, cpu = time.perf_counter(), time.process_time()
    for d in decoded_rows(pool, decode, read_tables([str(table)], SCHEMA, 1 << 24), window):
        if d.error is not None:
            raise d.error
        rows += 1
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    return rows / wall, cpu / rows, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--processes", type=int, default=max(1, available_cores() - 1))
    parser.add_argument("--workers", type=int, default=2, help="threads, for the threads row (predict's --workers)")
    parser.add_argument("--micro-batch-size", type=int, default=64,
                        help="predict's --micro_batch_size: sets the read-ahead window as predict does")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="small frames and few rows: checks the script")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    frame_num, img_size, size = (4, 32, (48, 40)) if args.tiny else (4, 224, (320, 240))
    rows = min(args.rows, 64) if args.tiny else args.rows
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="v2t-bench-input-"))
    workdir.mkdir(parents=True, exist_ok=True)
    table = write_table(workdir / "input.txt", rows, min(rows, 256), frame_num, size)
    decode = FrameDecoder("imgbase64", frame_num, img_size)
    P = args.processes
    chunk = rows_per_task(2 * args.micro_batch_size + 2 * P, P)  # what predict gives each process
    methods = [("threads", "-", 1, lambda: DecodePool(0, args.workers, decode.crop_shape)),
               ("processes, pickled crops", P, 1, lambda: PickledPool(P)),
               ("processes, shared memory", P, 1, lambda: DecodePool(P, 0, decode.crop_shape)),
               ("processes, shared memory (predict)", P, chunk, lambda: DecodePool(P, 0, decode.crop_shape, chunk))]
    results = {}
    for name, processes, per_task, make in methods:
        with make() as pool:
            window = 2 * args.micro_batch_size + 2 * pool.workers  # predict's
            runs = sorted(run(pool, decode, table, window) for _ in range(args.repeats))
        results[name] = (processes, per_task, *runs[len(runs) // 2][:2])
    base_rate, base_cpu = results["processes, pickled crops"][2:]
    print(f"\ninput pipeline, {rows} rows of {frame_num} frames {size[0]}x{size[1]} -> {img_size} px crops, "
          f"{available_cores()} cores, median of {args.repeats}\n")
    print("| method | processes | rows per task | rows/s | job CPU ms/row | rows/s x pickled | job CPU x pickled |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (processes, per_task, rate, cpu) in results.items():
        print(f"| {name} | {processes} | {per_task} | {rate:,.0f} | {cpu * 1e3:.3f} | {rate / base_rate:.2f} | "
              f"{cpu / base_cpu:.2f} |")
    print(flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

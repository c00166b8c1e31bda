"""Ray on one machine vs local `v2t predict`: videos/s of the same job on the same cores.

    python benchmarks/bench_ray.py            # the seed's full-size model, random weights
    python benchmarks/bench_ray.py --tiny     # the same code in seconds

Rows:
  local predict   `predict_tables` in process (what `v2t predict` runs), model loaded per job.
  Ray             `v2t_engine.ray.predict_tables_ray` on a local Ray instance of --cores CPUs,
                  started before the timed jobs (as a cluster is): Ray Data read tasks, decode
                  tasks, one caption actor (model loaded per job), the driver writing rows.
Both caption the same table (synthetic clips, JPEG frames of --frame-size) with the same
random-weight export, and their outputs are compared byte for byte.

Where Ray's time goes: the same two jobs on a one-row table give each one's fixed cost per job
(for Ray: starting the pipeline and the actor, loading the model there); what remains, divided
by the rows, is the cost per row, and the difference per row is Ray's moving of rows between
processes (serialization through the object store, scheduling of tasks and batches). The bytes
each row moves are printed too.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from bench_predict import make_table
from common import base_parser, checkpoint, describe, export, measure, print_table, setup
from v2t_engine.inputs.tables import InputSchema
from v2t_engine.jobs.predict import PredictOptions, predict_tables
from v2t_engine.runtime.captioner import Captioner

SCHEMA = "idx:str:1,imgbase64:str:1"
TARGET_RATIO = 0.80


def options(table: Path, out: Path, batch: int) -> PredictOptions:
    return PredictOptions(tables=(str(table),), outputs=str(out), input_schema=InputSchema.parse(SCHEMA),
                          micro_batch_size=batch)


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--rows", type=int, default=None, help="rows in the timed table (default: 24, tiny 400)")
    parser.add_argument("--batch-size", type=int, default=8, help="micro_batch_size of both")
    parser.add_argument("--frame-size", default="320x240", help="width x height of the table's frames")
    parser.add_argument("--cores", type=int, default=None, help="CPUs given to Ray (default: this process's)")
    parser.add_argument("--precision", default="fp32",
                        help="export precision (int8 captions may differ with batch composition: dynamic "
                             "quantization, so 'outputs identical' holds for fp32 only)")
    args = parser.parse_args()
    cfg, workdir = setup(args)
    workdir.mkdir(parents=True, exist_ok=True)
    export_dir = export(checkpoint(cfg, workdir), args.precision)
    rows = args.rows or (400 if args.tiny else 24)
    size = tuple(int(v) for v in args.frame_size.split("x"))
    table, one = make_table(workdir / f"ray-{rows}.txt", rows, cfg, size), make_table(workdir / "ray-1.txt", 1, cfg, size)

    import ray
    from v2t_engine.ray import RayOptions, predict_tables_ray

    cores = args.cores or len(os.sched_getaffinity(0))
    began = time.perf_counter()
    ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray_init = time.perf_counter() - began
    cluster = RayOptions(actors=1)

    def local(t: Path, out: Path):
        return lambda: predict_tables(Captioner.load(export_dir, threads=args.threads), options(t, out, args.batch_size))

    def on_ray(t: Path, out: Path):
        return lambda: predict_tables_ray(str(export_dir), options(t, out, args.batch_size),
                                          threads=args.threads, cluster=cluster)

    timings = {}
    for name, make in (("local predict", local), ("Ray", on_ray)):
        out = workdir / f"out-{name.split()[0]}.txt"
        timings[name] = (measure(make(table, out), args.repeats, args.max_seconds),
                         measure(make(one, workdir / f"one-{name.split()[0]}.txt"), args.repeats, args.max_seconds))
    ray.shutdown()
    same = (workdir / "out-local.txt").read_bytes() == (workdir / "out-Ray.txt").read_bytes()

    local_job, local_one = timings["local predict"]
    local_row = (local_job.median_s - local_one.median_s) / (rows - 1)
    pixels = cfg.frame_num * 3 * cfg.img_size * cfg.img_size
    table_row = table.stat().st_size / rows
    print(f"model: {describe(cfg)}; {rows} rows of {cfg.frame_num} frames {args.frame_size}; "
          f"{cores} cores for Ray; ray.init took {ray_init:.1f} s (left out); outputs identical: {same}")
    result = []
    for name, (job, one_row) in timings.items():
        per_row = (job.median_s - one_row.median_s) / (rows - 1)
        result.append([name, job.runs, job.median_s, rows / job.median_s,
                       local_job.median_s / job.median_s, one_row.median_s, per_row * 1e3,
                       local_row / per_row])
    print_table("Ray on one machine vs local predict",
                ["job", "runs", "seconds (median)", "videos/s", f"vs local (target >= {TARGET_RATIO:.0%})",
                 "1-row job s (fixed cost)", "ms/row beyond it", "vs local, per row beyond fixed cost"], result)
    print(f"each row moves {table_row / 1024:,.0f} KiB of table text (read task → decode task) and "
          f"{pixels / 1024:,.0f} KiB of uint8 frames (decode task → caption actor) through the object store")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""What durability costs `v2t predict`: the fsyncs of the outputs and the saves of the job record
(OUTPUTS.job.json) that make `--resume` possible, against the same job with no record.

    python benchmarks/bench_resume.py --tiny          # seconds: checks the script
    python benchmarks/bench_resume.py --rows 64       # full-size model (ViT-L/14 + 12-layer GPT)

Rows: no record (what `predict_tables` does when given no model directory: nothing to resume),
the default --sync_interval (10 s), and --sync_interval 0 (an fsync and a record after every
batch of finished rows: the worst case). The time spent in fsync + record saves is measured
directly (PredictReport.sync_seconds), so its share of the wall time does not depend on how
noisy the machine is; the videos/s ratio does. Rows a crash can cost: those finished after the
last record, at most --sync_interval seconds of captioning, captioned again on resume; none is
lost from the final output.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from common import base_parser, checkpoint, describe, export, print_table, setup

from bench_predict import SCHEMA, make_table
from v2t_engine.inputs.tables import InputSchema
from v2t_engine.jobs.predict import PredictOptions, predict_tables
from v2t_engine.runtime.captioner import Captioner

TARGET_SHARE = 0.01


def run(cap: Captioner, export_dir: Path | None, table: Path, out: Path, batch: int, interval: float):
    opts = PredictOptions(tables=(str(table),), outputs=str(out), input_schema=InputSchema.parse(SCHEMA),
                          micro_batch_size=batch, sync_interval=interval)
    began = time.perf_counter()
    report = predict_tables(cap, opts, model_dir=export_dir)
    return time.perf_counter() - began, report


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--rows", type=int, default=32, help="rows in the timed table")
    parser.add_argument("--batch-size", type=int, default=8, help="micro_batch_size")
    parser.add_argument("--precision", default="int8", help="v2t export precision")
    args = parser.parse_args()
    cfg, workdir = setup(args)
    export_dir = export(checkpoint(cfg, workdir), args.precision)
    cap = Captioner.load(export_dir, backend="ort", threads=args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="v2t-bench-resume-"))
    rows = args.rows * (20 if args.tiny else 1)
    table = make_table(tmp / "table.txt", rows, cfg, (320, 240))
    run(cap, None, make_table(tmp / "warm.txt", args.batch_size, cfg, (320, 240), seed=1), tmp / "warm.out",
        args.batch_size, 10.0)
    results = []
    for name, directory, interval in (("no record", None, 10.0), ("--sync_interval 10 (default)", export_dir, 10.0),
                                      ("--sync_interval 0 (every batch)", export_dir, 0.0)):
        times = []
        for _ in range(max(1, args.repeats)):
            wall, report = run(cap, directory, table, tmp / "out.txt", args.batch_size, interval)
            times.append((wall, report.syncs, report.sync_seconds))
        wall, syncs, sync_s = sorted(times)[len(times) // 2]
        results.append([name, rows / wall, syncs, sync_s * 1e3, sync_s / wall])
    base = results[0][1]
    for r in results:
        r.insert(2, r[1] / base)
    print(f"durability benchmark, model {describe(cfg)} ({args.precision}), {rows} rows, batch {args.batch_size}")
    print_table("Predict with and without the job record", ["run", "videos/s", "x no record", "records saved",
                                                             "fsync+record ms", "share of wall"], results)
    share = results[1][-1]
    print(f"target: fsync + record <= {TARGET_SHARE:.0%} of wall time at the default interval: {share:.3%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End to end: `v2t predict` on a generated table vs a pipeline equivalent to EasyNLP's predict,
and v2t's peak memory on a table ten times longer.

    python benchmarks/bench_predict.py            # the seed's full-size model, random weights
    python benchmarks/bench_predict.py --tiny     # the same code in seconds

Rows:
  EasyNLP-equivalent  read the table, decode and preprocess each row's frames serially, encode
                      with the eager fp32 PyTorch ViT, decode with the seed's algorithm (whole
                      sequence recomputed every step, greedy: EASYNLP.md §7) in batches of
                      --batch-size, write the captions.
  v2t predict/P       `v2t predict` (predict_tables, in process) on the `v2t export --precision P`
                      graphs with --micro_batch_size --batch-size.
Both read the same table (synthetic clips of moving shapes, JPEG frames of --frame-size) and
caption with the same random-weight model, whose [PAD] never wins (common.never_end), so every
caption is text_len tokens long. Agreement is the share of captions equal to the baseline's.

Peak RSS: `v2t predict` runs as a subprocess (the real CLI) on --rss-rows rows and on ten times as
many; the growth between the two is what streaming must keep small.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from itertools import cycle, islice
from pathlib import Path

import numpy as np
import torch

from common import (base_parser, checkpoint, describe, export, load_eager, measure, print_table,
                    recompute_greedy, setup)
from v2t_engine.runtime.captioner import Captioner
from v2t_engine.config import ModelConfig
from v2t_engine.inputs.frames import FrameSource, row_frames_or_error
from v2t_engine.jobs.predict import PredictOptions, predict_tables
from v2t_engine.inputs.preprocess import normalize
from v2t_engine.jobs.synth import COLOURS, MOTIONS, SHAPES, encode_frames, make_clip
from v2t_engine.inputs.tables import InputSchema, read_table
from v2t_engine.tokenizer import CaptionTokenizer

SCHEMA = "idx:str:1,imgbase64:str:1"
TARGET_SPEEDUP = 3.0
TARGET_RSS_GROWTH = 0.10


def make_table(path: Path, rows: int, cfg: ModelConfig, frame_size: tuple[int, int], seed: int = 0) -> Path:
    """An EasyNLP predict table (idx, imgbase64) of synthetic clips."""
    rng = np.random.default_rng(seed)
    kinds = cycle([(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS])
    with open(path, "w", encoding="utf-8") as f:
        for i, (colour, shape, motion) in enumerate(islice(kinds, rows)):
            clip = make_clip(rng, colour, shape, motion, frames=cfg.frame_num, size=frame_size)
            f.write(f"v{i:06d}\t{encode_frames(clip)}\n")
    return path


def easynlp_equivalent(model, tokenizer: CaptionTokenizer, table: Path, out: Path, batch: int) -> None:
    cfg = model.cfg
    rows = list(read_table(table, InputSchema.parse(SCHEMA)))
    with open(out, "w", encoding="utf-8") as f, torch.inference_mode():
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            pixels = np.stack([row_frames_or_error(r, "imgbase64", cfg.frame_num, cfg.img_size, FrameSource())[0]
                               for r in chunk])  # (B, F, 3, S, S) uint8, decoded one row after another
            frames = torch.from_numpy(normalize(pixels)).flatten(0, 1)  # (B*F, 3, S, S)
            prefix = model.first_stage_model(frames, every_token=True).view(len(chunk), cfg.frame_num, -1)  # (B, F, E)
            tokens = recompute_greedy(model, prefix, cfg.text_len)
            for row, ids in zip(chunk, tokens.tolist()):
                f.write(f"{row.idx}\t{json.dumps([tokenizer.decode(ids)], ensure_ascii=False)}\n")


def v2t_predict(captioner: Captioner, table: Path, out: Path, batch: int) -> None:
    predict_tables(captioner, PredictOptions(tables=(str(table),), outputs=str(out),
                                             input_schema=InputSchema.parse(SCHEMA), micro_batch_size=batch))


def captions(out: Path) -> list[str]:
    return [json.loads(line.split("\t")[1])[0] for line in out.read_text(encoding="utf-8").splitlines()]


# Runs the v2t CLI and, at exit, writes the process's own peak RSS (VmHWM, KiB) to a file.
# Not wait4's ru_maxrss: Linux folds the high-water mark of the memory a child had before exec
# (its parent's, after fork) into that figure, so every child of this multi-GiB benchmark
# process would report the benchmark's own peak.
_CLI_WITH_PEAK = """
import atexit, os, runpy, sys
def report():
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    with open(os.environ["V2T_BENCH_PEAK_FILE"], "w") as out:
        out.write(hwm.split()[1])
atexit.register(report)
sys.argv[0] = "v2t"
runpy.run_module("v2t_engine.cli", run_name="__main__", alter_sys=True)
"""


def peak_rss_mib(export_dir: Path, table: Path, out: Path, batch: int, threads: int | None) -> float:
    """Peak resident memory of a `v2t predict` process on `table`, in MiB (Linux: /proc)."""
    cmd = [sys.executable, "-c", _CLI_WITH_PEAK, "predict", "--tables", str(table), "--outputs", str(out),
           "--checkpoint_dir", str(export_dir), "--input_schema", SCHEMA, "--first_sequence", "imgbase64",
           "--micro_batch_size", str(batch)] + (["--threads", str(threads)] if threads else [])
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak_kib"
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "V2T_BENCH_PEAK_FILE": str(peak_file)})
        if proc.returncode != 0:
            raise RuntimeError(f"v2t predict failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
        return int(peak_file.read_text()) / 1024


def main() -> int:
    parser = base_parser(__doc__)
    parser.set_defaults(repeats=3)
    parser.add_argument("--rows", type=int, default=16, help="rows in the timed table")
    parser.add_argument("--rss-rows", type=int, default=8, help="rows of the short table for peak RSS")
    parser.add_argument("--batch-size", type=int, default=8, help="micro_batch_size of both pipelines")
    parser.add_argument("--frame-size", default="320x240", help="width x height of the table's frames")
    parser.add_argument("--precisions", default="fp32,int8_encoder,int8", help="v2t export precisions to run")
    args = parser.parse_args()
    cfg, workdir = setup(args)
    ck = checkpoint(cfg, workdir)
    precisions = args.precisions.split(",")
    frame_size = tuple(int(v) for v in args.frame_size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="v2t-bench-predict-"))
    table = make_table(tmp / "table.txt", args.rows, cfg, frame_size)
    warm = make_table(tmp / "warm.txt", args.batch_size, cfg, frame_size, seed=1)

    model, tokenizer = load_eager(ck), CaptionTokenizer.from_dir(ck)
    runs = [("EasyNLP-equivalent", lambda t, o: easynlp_equivalent(model, tokenizer, t, o, args.batch_size))]
    for p in precisions:
        cap = Captioner.load(export(ck, p), backend="ort", threads=args.threads)
        runs.append((f"v2t predict/{p}", lambda t, o, cap=cap: v2t_predict(cap, t, o, args.batch_size)))

    rows, base = [], None
    for name, fn in runs:
        out = tmp / f"{len(rows)}.out"
        t = measure(lambda: fn(table, out), args.repeats, args.max_seconds, warmup=lambda: fn(warm, out))
        got = captions(out)
        base = base or (t.median_s, got)
        agree = float(np.mean([a == b for a, b in zip(got, base[1])]))
        rows.append([name, args.rows / t.median_s, base[0] / t.median_s,
                     "identical" if agree == 1.0 else f"{agree:.1%}", t.runs])

    rss_precision = precisions[-1]
    short = make_table(tmp / "short.txt", args.rss_rows, cfg, frame_size)
    long = make_table(tmp / "long.txt", 10 * args.rss_rows, cfg, frame_size)
    rss = [peak_rss_mib(export(ck, rss_precision), t, tmp / "rss.out", args.batch_size, args.threads)
           for t in (short, long)]

    print(f"predict benchmark, model {describe(cfg)}, {args.rows} rows of {cfg.frame_num} "
          f"{args.frame_size} JPEG frames, batch {args.batch_size}")
    print_table("End to end (table in, captions out)", ["pipeline", "videos/s", "x EasyNLP-equivalent",
                                                        "agreement", "runs"], rows)
    growth = rss[1] / rss[0] - 1
    print_table(f"Peak RSS of `v2t predict` (export {rss_precision})", ["rows", "peak RSS MiB"],
                [[args.rss_rows, rss[0]], [10 * args.rss_rows, rss[1]]])
    best = max(rows[1:], key=lambda r: r[2])
    print(f"target >= {TARGET_SPEEDUP:g}x EasyNLP-equivalent: {best[2]:.2f}x ({best[0]})")
    print(f"target peak RSS growth <= {TARGET_RSS_GROWTH:.0%} for a 10x longer table: {growth:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

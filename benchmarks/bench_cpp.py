"""The C++ example against `v2t predict`: throughput on the same export, frames and cores.

    cpp/build.sh && python benchmarks/bench_cpp.py          # the seed's full-size model
    python benchmarks/bench_cpp.py --tiny                    # the same code in seconds

Rows (each a whole process, as a user runs it: start, load the export, decode the JPEG frames,
caption, print or write):
  v2t predict        `v2t predict --tables` on a table of base64 JPEG frames, --micro_batch_size B
  v2t-caption        cpp/build/v2t-caption --list on the same frames as JPEG files, --batch B
and `v2t predict (in process)`: predict_tables on an already loaded Captioner, so without Python's
start-up and the export's load. Agreement is the share of captions equal to `v2t predict`'s.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_predict import SCHEMA, captions, make_table, v2t_predict
from common import base_parser, checkpoint, describe, export, measure, print_table, setup
from v2t_engine.runtime.captioner import Captioner

ROOT = Path(__file__).resolve().parents[1]
CAPTION = ROOT / "cpp" / "build" / "v2t-caption"


def jpeg_list(table: Path, folder: Path) -> Path:
    """The table's frames as JPEG files, and v2t-caption's list (one video's files a line)."""
    folder.mkdir(exist_ok=True)
    lines = []
    for line in table.read_text(encoding="utf-8").splitlines():
        idx, field = line.split("\t")[:2]
        paths = []
        for i, b64 in enumerate(json.loads(field)):
            paths.append(folder / f"{idx}_{i}.jpg")
            paths[-1].write_bytes(base64.b64decode(b64))
        lines.append(" ".join(map(str, paths)))
    out = folder / "videos.txt"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def predict_cli(export_dir: Path, table: Path, out: Path, batch: int, threads: int | None) -> None:
    cmd = [sys.executable, "-m", "v2t_engine.cli", "predict", "--tables", str(table), "--outputs", str(out),
           "--checkpoint_dir", str(export_dir), "--input_schema", SCHEMA, "--first_sequence", "imgbase64",
           "--micro_batch_size", str(batch)] + (["--threads", str(threads)] if threads else [])
    subprocess.run(cmd, check=True, capture_output=True)


def caption_cli(export_dir: Path, videos: Path, out: Path, batch: int, threads: int | None) -> None:
    cmd = [str(CAPTION), str(export_dir), "--list", str(videos), "--batch", str(batch)]
    cmd += ["--threads", str(threads)] if threads else []
    with open(out, "w", encoding="utf-8") as f:
        subprocess.run(cmd, check=True, stdout=f)


def main() -> int:
    parser = base_parser(__doc__)
    parser.set_defaults(repeats=3)
    parser.add_argument("--rows", type=int, default=16, help="videos in the table")
    parser.add_argument("--batch-size", type=int, default=8, help="videos decoded together, in both programs")
    parser.add_argument("--frame-size", default="320x240", help="width x height of the JPEG frames")
    args = parser.parse_args()
    if not CAPTION.is_file():
        print(f"{CAPTION} is missing: run cpp/build.sh first", file=sys.stderr)
        return 1
    cfg, workdir = setup(args)
    export_dir = export(checkpoint(cfg, workdir), "fp32")
    tmp = Path(tempfile.mkdtemp(prefix="v2t-bench-cpp-"))
    table = make_table(tmp / "table.txt", args.rows, cfg, tuple(int(v) for v in args.frame_size.split("x")))
    videos = jpeg_list(table, tmp / "frames")
    cap = Captioner.load(export_dir, backend="ort", threads=args.threads)
    b, t = args.batch_size, args.threads
    runs = [("v2t predict", tmp / "py.out", lambda o: predict_cli(export_dir, table, o, b, t), captions),
            ("v2t predict (in process)", tmp / "inproc.out", lambda o: v2t_predict(cap, table, o, b), captions),
            ("v2t-caption", tmp / "cpp.out", lambda o: caption_cli(export_dir, videos, o, b, t),
             lambda o: o.read_text(encoding="utf-8").splitlines())]
    rows, base = [], None
    for name, out, fn, read in runs:
        timing = measure(lambda: fn(out), args.repeats, args.max_seconds, warmup=lambda: fn(out))
        got = read(out)
        base = base or (timing.median_s, got)
        agree = sum(a == c for a, c in zip(got, base[1])) / len(base[1])
        rows.append([name, args.rows / timing.median_s, base[0] / timing.median_s,
                     "identical" if agree == 1.0 else f"{agree:.1%}", timing.runs])
    print(f"C++ benchmark, model {describe(cfg)}, {args.rows} videos of {cfg.frame_num} {args.frame_size} "
          f"JPEG frames, batch {b}, threads {t or 'all cores'}")
    print_table("v2t-caption vs v2t predict (whole processes)", ["program", "videos/s", "x v2t predict",
                                                                 "agreement", "runs"], rows)
    print(f"target: v2t-caption's captions identical to v2t predict's: {rows[-1][3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

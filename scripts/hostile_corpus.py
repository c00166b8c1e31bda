"""Build a corpus of hostile inputs and run `v2t predict` and `v2t make-table` over it (issue 13).

Three pairs of runs, each a clean input and a hostile input holding the same good rows (or
videos) interleaved with bad ones:

- predict, base64 table: invalid base64, not JSON, deep JSON, an empty list, invalid UTF-8, too few
  columns, a truncated image, garbage bytes, a PNG declaring 10^10 pixels, 10,000 frames in a
  row, a line over max_row_bytes (100 MB by default);
- predict, image paths (enable_img_path=true): /dev/zero, a FIFO, a 3 GB sparse file, a link
  loop, a link out of the root, ``..``, an absolute path, a directory, a missing file, a NUL;
- make-table, a list of videos (needs PyAV): garbage, truncated, empty, audio only, over
  --max_video_bytes, over --max_video_seconds (declared, and undeclared raw H.264), a frame
  folder with a broken image, /dev/zero, a FIFO, a missing file, a 70,000-character line.

Each command runs as a subprocess. A hostile run passes when it has no traceback in its output,
its peak RSS stays within 2x the clean run's, every good row comes out in input order with the
clean run's result, and every bad row is in OUTPUTS.errors.tsv with the expected reason.

    python scripts/hostile_corpus.py --checkpoint_dir EXPORT [--work DIR] [--rows 24] [--videos 4]

Exit status 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

SCHEMA = "idx:str:1,imgbase64:str:1"
ROW_CAP = 16_000_000  # max_row_bytes for both runs of the table pair: the long line is over it


@dataclass
class Case:
    """One pair of runs: the arguments of the clean and the hostile run, where their outputs go,
    the good idx in input order, and the expected reason (a substring) for each bad idx."""
    name: str
    clean_args: list[str]
    hostile_args: list[str]
    clean_out: Path
    hostile_out: Path
    good: list[str]
    bad: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    code: int
    peak_mb: float
    seconds: float
    output: str


# Runs the command and writes its peak RSS (KiB) to a file. A small process of its own, because a
# child's peak RSS counts the memory of the process it was forked from until it execs.
_MEASURE = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
            "sys.exit(code)")


def run_v2t(args: list[str], log: Path) -> Run:
    """`python -m v2t_engine.cli ARGS`: its exit status, output and peak RSS (its own and that of
    the worker processes it waited for)."""
    start = time.perf_counter()
    peak = log.with_suffix(".rss")
    with open(log, "w+", encoding="utf-8") as out:
        code = subprocess.call([sys.executable, "-c", _MEASURE, str(peak), sys.executable, "-m", "v2t_engine.cli",
                                *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "TQDM_DISABLE": "1"})
        out.seek(0)
        text = out.read()
    kib = int(peak.read_text()) if peak.is_file() else 0
    return Run(code, kib / 1024, time.perf_counter() - start, text)


# ---------------------------------------------------------------------------------------------
# Tables


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_declaring(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + b"\0\0\0\0IEND\xaeB`\x82")


def good_rows(work: Path, n: int) -> list[tuple[str, list[bytes]]]:
    from v2t_engine.jobs.synth import write_dataset

    paths = write_dataset(work / "synth", n_train=0, n_val=0, n_test=n, frames=4, seed=7)
    rows = []
    for line in paths["test"].read_text(encoding="utf-8").splitlines():
        idx, field_ = line.split("\t")[:2]
        rows.append((idx, [base64.b64decode(f) for f in json.loads(field_)]))
    return rows


def bad_table_lines(good: list[tuple[str, list[bytes]]], huge_mb: int) -> list[tuple[str, bytes, str]]:
    """(idx, the raw line, expected reason) of every bad row of the base64 table."""
    frame = good[0][1][0]
    tiny = Image.new("RGB", (4, 4), 9)
    buf = io.BytesIO()
    tiny.save(buf, "PNG")

    def line(idx: str, field_: str) -> bytes:
        return f"{idx}\t{field_}\n".encode("utf-8")

    return [
        ("b64", line("b64", json.dumps(["@@not base64@@"])), "invalid base64"),
        ("notjson", line("notjson", "frames here"), "not a JSON list"),
        ("deep", line("deep", "[" * 100_000 + "]" * 100_000), "not a JSON list"),
        ("empty", line("empty", "[]"), "frames list is empty"),
        ("utf8", b"utf8\t[\"\xff\xfe\"]\n", "not valid UTF-8"),
        ("columns", b"columns\n", "expected 2 tab-separated columns"),
        ("truncated", line("truncated", json.dumps([b64(frame[: len(frame) // 2])])), "truncated image"),
        ("garbage", line("garbage", json.dumps([b64(os.urandom(3000))])), "not an image"),
        ("bomb", line("bomb", json.dumps([b64(png_declaring(100_000, 100_000))])), "pixels"),
        ("many", line("many", json.dumps([b64(buf.getvalue())] * 10_000)), "max_row_frames"),
        ("huge", None, "max_row_bytes"),  # written in chunks by table_case: huge_mb MiB
    ]


def table_case(work: Path, good, huge_mb: int) -> Case:
    lines = {idx: f"{idx}\t{json.dumps([b64(f) for f in frames])}\n".encode() for idx, frames in good}
    bad = bad_table_lines(good, huge_mb)
    clean, hostile = work / "clean.txt", work / "hostile.txt"
    clean.write_bytes(b"".join(lines.values()))
    with open(hostile, "wb") as f:
        for i, raw in enumerate(lines.values()):  # a bad row after every good one, the rest at the end
            f.write(raw)
            if i < len(bad):
                _write_bad(f, bad[i][1], huge_mb)
        for _, raw, _ in bad[len(lines):]:
            _write_bad(f, raw, huge_mb)
    return _predict_case("predict tables", work, clean, hostile, [idx for idx, _ in good],
                         {idx: why for idx, _, why in bad}, f"max_row_bytes={ROW_CAP}")


def _write_bad(f, raw: bytes | None, huge_mb: int) -> None:
    if raw is not None:
        f.write(raw)
        return
    f.write(b'huge\t["')
    for _ in range(huge_mb):
        f.write(b"A" * (1 << 20))
    f.write(b'"]\n')


def _predict_case(name: str, work: Path, clean: Path, hostile: Path, good: list[str], bad: dict[str, str],
                  params: str) -> Case:
    tag = name.replace(" ", "_")
    outs = work / f"{tag}_clean.out", work / f"{tag}_hostile.out"
    args = [["predict", "--tables", table, "--outputs", out, "--input_schema", SCHEMA, "--first_sequence",
             "imgbase64", "--micro_batch_size", 8, "--user_defined_parameters", params]
            for table, out in zip((clean, hostile), outs)]
    return Case(name, args[0], args[1], outs[0], outs[1], good, bad)


def paths_case(work: Path, good) -> Case:
    root = work / "frames"
    root.mkdir()
    entries = {}
    for idx, frames in good:
        (root / idx).mkdir()
        for k, data in enumerate(frames):
            (root / idx / f"{k}.jpg").write_bytes(data)
        entries[idx] = [f"{idx}/{k}.jpg" for k in range(len(frames))]
    os.mkfifo(root / "fifo")
    with open(root / "sparse.jpg", "wb") as f:
        f.truncate(3 << 30)
    (root / "loop").symlink_to(root / "loop")
    (work / "secret.jpg").write_bytes(good[0][1][0])
    (root / "out.jpg").symlink_to(work / "secret.jpg")
    bad = {"zero": (["/dev/zero"], "leaves img_root_dir"), "fifo": (["fifo"], "not a regular file"),
           "sparse": (["sparse.jpg"], "max_image_bytes"), "loop": (["loop"], "loop of symbolic links"),
           "link": (["out.jpg"], "leaves img_root_dir"), "dotdot": (["../secret.jpg"], "leaves img_root_dir"),
           "absolute": ([str(work / "secret.jpg")], "leaves img_root_dir"), "dir": ([good[0][0]], "not a regular file"),
           "missing": (["nope.jpg"], "not found"), "nul": (["a\0b.jpg"], "NUL")}
    clean, hostile = work / "clean_paths.txt", work / "hostile_paths.txt"
    clean.write_text("".join(f"{i}\t{json.dumps(e)}\n" for i, e in entries.items()), encoding="utf-8")
    mixed = []
    bad_items = list(bad.items())
    for i, (idx, e) in enumerate(entries.items()):
        mixed.append(f"{idx}\t{json.dumps(e)}\n")
        if i < len(bad_items):
            mixed.append(f"{bad_items[i][0]}\t{json.dumps(bad_items[i][1][0])}\n")
    mixed += [f"{idx}\t{json.dumps(e)}\n" for idx, (e, _) in bad_items[len(entries):]]
    hostile.write_text("".join(mixed), encoding="utf-8")
    return _predict_case("predict paths", work, clean, hostile, list(entries), {k: v[1] for k, v in bad.items()},
                         f"enable_img_path=true img_root_dir={root}")


# ---------------------------------------------------------------------------------------------
# Videos


def _encode(av, path: Path, n: int, seed: int, fmt: str | None = None, codec: str = "libx264", noise=False):
    import numpy as np

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        base = rng.integers(0, 256, 3, dtype=np.uint8)
        for i in range(n):
            image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) if noise else np.full((48, 64, 3), base, np.uint8)
            if not noise:
                image[:, : (i * 7) % 64] = 255 - base  # a moving edge
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _audio_only(av, path: Path) -> None:
    import numpy as np

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_case(work: Path, n: int) -> Case | None:
    try:
        import av
    except ImportError:
        return None
    vids = work / "videos"
    vids.mkdir()
    good = []
    for i in range(n):
        _encode(av, vids / f"good{i}.mp4", 20, seed=i)  # 0.8 s
        good.append(str(vids / f"good{i}.mp4"))
    bad = _bad_videos(av, work, vids)
    (work / "clean_videos.txt").write_text("\n".join(good) + "\n", encoding="utf-8")
    mixed = []
    for i, path in enumerate(good):
        mixed.append(path)
        mixed += list(bad)[i::n]
    (work / "hostile_videos.txt").write_text("\n".join(mixed) + "\n", encoding="utf-8")
    # An over-long list line has no idx of its own: it is reported as "LIST line N".
    bad = {(f"hostile_videos.txt line {mixed.index(k) + 1}" if len(k) > 65536 else k): v for k, v in bad.items()}
    cap = max(os.path.getsize(p) for p in good) * 2
    outs = work / "videos_clean.out", work / "videos_hostile.out"
    args = [["make-table", "--videos", listing, "--outputs", out, "--workers", 2, "--frames", 4,
             "--max_video_bytes", cap, "--max_video_seconds", 2]
            for listing, out in zip((work / "clean_videos.txt", work / "hostile_videos.txt"), outs)]
    return Case("make-table videos", args[0], args[1], outs[0], outs[1], good, bad)


def _bad_videos(av, work: Path, vids: Path) -> dict[str, str]:
    """Bad inputs (list entries) → expected reason."""
    _encode(av, vids / "long.mp4", 100, seed=50)  # 4 s, declared in the header
    _encode(av, vids / "raw.h264", 100, seed=51, fmt="h264")  # 4 s, declared nowhere
    _encode(av, vids / "big.mkv", 40, seed=52, codec="mpeg4", noise=True)
    whole = (vids / "long.mp4").read_bytes()
    (vids / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    (vids / "garbage.mp4").write_bytes(os.urandom(3000))  # under the size cap: FFmpeg must refuse it
    (vids / "empty.mp4").write_bytes(b"")
    _audio_only(av, vids / "audio.mp4")
    folder = vids / "frames_broken"
    folder.mkdir()
    Image.new("RGB", (32, 24), 50).save(folder / "0.png")
    (folder / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    os.mkfifo(work / "fifo.mp4")
    long_line = "x" * 70_000
    return {str(vids / "long.mp4"): "max_video_seconds", str(vids / "raw.h264"): "max_video_seconds",
            str(vids / "big.mkv"): "max_video_bytes", str(vids / "truncated.mp4"): "",
            str(vids / "garbage.mp4"): "", str(vids / "empty.mp4"): "is empty",
            str(vids / "audio.mp4"): "no video stream", str(folder): "frame '1.png'",
            "/dev/zero": "not a regular file", str(work / "fifo.mp4"): "not a regular file",
            str(work / "missing.mp4"): "does not exist", long_line: "longer than 65536 characters"}


# ---------------------------------------------------------------------------------------------
# Checks


def read_rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def read_errors(out: Path) -> dict[str, str]:
    rows = read_rows(Path(f"{out}.errors.tsv"))[1:]
    return {r[1]: r[2] for r in rows if len(r) >= 3}


def check(case: Case, clean: Run, hostile: Run) -> list[str]:
    """What the hostile run got wrong (empty: nothing)."""
    problems = []
    if clean.code != 0:
        problems.append(f"the clean run exited {clean.code}: {clean.output.strip()[-300:]}")
    if hostile.code != 3:
        problems.append(f"exit status {hostile.code}, expected 3 (rows left out)")
    if "Traceback" in hostile.output:
        problems.append("a traceback in its output")
    if hostile.peak_mb > 2 * clean.peak_mb:
        problems.append(f"peak RSS {hostile.peak_mb:.0f} MB > 2x the clean run's {clean.peak_mb:.0f} MB")
    want = {r[0]: r[1:] for r in read_rows(case.clean_out)}
    got = read_rows(case.hostile_out)
    if [r[0] for r in got] != case.good:
        problems.append(f"good rows out of order or missing: {[r[0] for r in got][:8]}...")
    elif any(r[1:] != want.get(r[0]) for r in got):
        problems.append("a good row's result differs from the clean run's")
    reasons = read_errors(case.hostile_out)
    for idx, why in case.bad.items():
        found = reasons.get(idx)
        if found is None:
            problems.append(f"bad row {idx!r} not reported")
        elif why not in found:
            problems.append(f"bad row {idx!r}: reason {found!r} lacks {why!r}")
    if len(reasons) != len(case.bad):
        problems.append(f"{len(reasons)} rows reported, {len(case.bad)} expected")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_dir", required=True, help="An export (or checkpoint) for v2t predict.")
    parser.add_argument("--work", default=None, help="Directory for the corpus (default: a temporary one).")
    parser.add_argument("--rows", type=int, default=24, help="Good rows per table.")
    parser.add_argument("--videos", type=int, default=4, help="Good videos.")
    parser.add_argument("--huge_mb", type=int, default=100, help="Size of the over-long table line, in MiB.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="v2t-hostile-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        good = good_rows(work, args.rows)
        cases = [table_case(work, good, args.huge_mb), paths_case(work, good), video_case(work, args.videos)]
        return report([c for c in cases if c is not None], args.checkpoint_dir, work)


def report(cases: list[Case], checkpoint_dir: str, work: Path) -> int:
    header = f"{'run':<18} {'exit':>4} {'good':>9} {'reported':>9} {'RSS MB':>7} {'clean MB':>8} {'ratio':>5} {'s':>6}  verdict"
    print(header)
    print("-" * len(header))
    failed = 0
    for case in cases:
        model = ["--checkpoint_dir", checkpoint_dir] if case.clean_args[0] == "predict" else []
        tag = case.name.replace(" ", "_")
        clean = run_v2t(case.clean_args + model, work / f"{tag}_clean.log")
        hostile = run_v2t(case.hostile_args + model, work / f"{tag}_hostile.log")
        problems = check(case, clean, hostile)
        failed += bool(problems)
        got = len(read_rows(case.hostile_out))
        print(f"{case.name:<18} {hostile.code:>4} {got:>4}/{len(case.good):<4} "
              f"{len(read_errors(case.hostile_out)):>4}/{len(case.bad):<4} {hostile.peak_mb:>7.0f} "
              f"{clean.peak_mb:>8.0f} {hostile.peak_mb / clean.peak_mb:>5.2f} {hostile.seconds:>6.1f}  "
              + ("ok" if not problems else "FAIL"))
        for problem in problems:
            print(f"    - {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

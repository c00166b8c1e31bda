"""`v2t serve` under concurrent clients, against what users write today and against a batch job.

    python benchmarks/bench_serve.py --workdir bench      # the seed's full-size model, int8 export
    python benchmarks/bench_serve.py --tiny               # the same code in seconds

Rows (all on the same JPEG clips, measured in one run, one after another so none competes with
another for the cores):
  per-request Captioner  each request served alone, one after another, in process: decode its
                         frames, `Captioner.caption_pixels` on one video (what a service without
                         shared batching does). Its median latency is "a single offline caption".
  offline v2t predict    `predict_tables` on a table of the same clips, --micro_batch_size SLOTS:
                         the batch job's videos/s.
  v2t serve, c=N         a real `v2t serve` process on 127.0.0.1 (--slots SLOTS); N client threads,
                         each with a keep-alive connection, send the clips' frames as JSON until
                         the round's requests are done; requests/s and p50/p99 latency.
Agreement: the share of captions equal to offline predict's (greedy). An int8 export quantizes
activations per call (dynamic quantization), so captions may depend on which videos share a
batch; fp32 exports give identical captions.

Where the time goes: the per-request rows also time the frame encoder (ViT) alone; its share of a
request says how far batching the decoder can take a service at this model size.
"""
from __future__ import annotations

import http.client
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench_predict import SCHEMA, make_table
from common import base_parser, checkpoint, describe, export, print_table, setup
from v2t_engine.inputs.frames import FrameSource, load_row_frames
from v2t_engine.inputs.tables import InputSchema
from v2t_engine.jobs.predict import PredictOptions, predict_tables
from v2t_engine.runtime.captioner import Captioner
from v2t_engine.runtime.generator import encode_videos

TARGET_THROUGHPUT = 0.90  # of offline predict's videos/s, at concurrency 32
TARGET_LATENCY = 1.20  # p99 at concurrency 1 over a single offline caption


def read_rows(table: Path) -> list[tuple[str, list[str]]]:
    rows = []
    for line in table.read_text(encoding="utf-8").splitlines():
        idx, field = line.split("\t")[:2]
        rows.append((idx, json.loads(field)))
    return rows


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def per_request(captioner: Captioner, rows, requests: int) -> dict:
    """Requests served one at a time, each its own Captioner call."""
    cfg = captioner.config
    latencies, encode_s, captions = [], [], {}
    for i in range(requests + 1):  # the first is a warm-up
        idx, frames = rows[i % len(rows)]
        start = time.perf_counter()
        crops, _ = load_row_frames(json.dumps(frames), cfg.frame_num, cfg.img_size, FrameSource())
        pixels = crops[None]  # (1, F, 3, S, S) uint8
        captions[idx] = captioner.caption_pixels(pixels)[0]
        elapsed = time.perf_counter() - start
        t0 = time.perf_counter()
        encode_videos(captioner.backend, pixels)
        if i:
            latencies.append(elapsed)
            encode_s.append(time.perf_counter() - t0)
    return {"latencies": latencies, "rps": len(latencies) / sum(latencies), "captions": captions,
            "encode_share": statistics.median(encode_s) / statistics.median(latencies)}


def offline_predict(captioner: Captioner, table: Path, warm: Path, out: Path, slots: int) -> dict:
    def run(t: Path) -> None:
        predict_tables(captioner, PredictOptions(tables=(str(t),), outputs=str(out),
                                                 input_schema=InputSchema.parse(SCHEMA), micro_batch_size=slots))
    run(warm)
    start = time.perf_counter()
    run(table)
    elapsed = time.perf_counter() - start
    captions = {}
    for line in out.read_text(encoding="utf-8").splitlines():
        idx, text = line.split("\t")
        captions[idx] = json.loads(text)
    return {"vps": len(captions) / elapsed, "captions": captions}


class ServerProcess:
    def __init__(self, export_dir: Path, slots: int, threads: int | None, log: Path):
        args = [sys.executable, "-m", "v2t_engine.cli", "serve", "--checkpoint_dir", str(export_dir), "--port", "0",
                "--slots", str(slots), "--max_queue", "1024", "--timeout", "3600"]
        self.log = open(log, "w+")
        self.proc = subprocess.Popen(args + (["--threads", str(threads)] if threads else []),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.port = self._wait(lambda: re.search(r"http://127\.0\.0\.1:(\d+)", log.read_text()), log)
        self._wait(lambda: self._ready(), log)

    def _wait(self, check, log: Path, timeout: float = 1800):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"v2t serve exited: {log.read_text()[-3000:]}")
            found = check()
            if found:
                return int(found.group(1)) if isinstance(found, re.Match) else found
            time.sleep(0.2)
        raise RuntimeError(f"v2t serve did not start: {log.read_text()[-3000:]}")

    def _ready(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)
        self.log.close()


def load_round(port: int, bodies: list[tuple[str, bytes]], concurrency: int, requests: int) -> dict:
    """`requests` POSTs from `concurrency` client threads; latency of each, wall time of all."""
    latencies, captions, errors = [], {}, []
    next_request = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        while True:
            with lock:
                i = next(next_request, None)
            if i is None:
                return
            idx, body = bodies[i % len(bodies)]
            start = time.perf_counter()
            conn.request("POST", "/v1/captions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            elapsed = time.perf_counter() - start
            with lock:
                if resp.status != 200:
                    errors.append(f"{resp.status} {data[:200]!r}")
                latencies.append(elapsed)
                captions[idx] = json.loads(data).get("captions")

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"rps": requests / wall, "latencies": latencies, "captions": captions}


def agreement(got: dict, want: dict) -> str:
    share = float(np.mean([got[k] == want[k] for k in got]))
    return "identical" if share == 1.0 else f"{share:.1%}"


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--precision", default="int8", help="v2t export precision served")
    parser.add_argument("--slots", type=int, default=8, help="serve --slots and predict --micro_batch_size")
    parser.add_argument("--concurrency", default="1,8,32,64", help="client threads, one round each")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per round at least (default: 64 tiny, 16 full); a round sends "
                             "at least one per client")
    parser.add_argument("--rows", type=int, default=None, help="clips in the table (default: 64 tiny, 32 full)")
    parser.add_argument("--frame-size", default="320x240", help="width x height of the JPEG frames")
    args = parser.parse_args()
    cfg, workdir = setup(args)
    requests = args.requests or (64 if args.tiny else 16)
    rows_n = args.rows or (64 if args.tiny else 32)
    levels = [int(c) for c in args.concurrency.split(",")]
    exp = export(checkpoint(cfg, workdir), args.precision)
    tmp = Path(tempfile.mkdtemp(prefix="v2t-bench-serve-"))
    frame_size = tuple(int(v) for v in args.frame_size.split("x"))
    table = make_table(tmp / "table.txt", rows_n, cfg, frame_size)
    warm = make_table(tmp / "warm.txt", args.slots, cfg, frame_size, seed=1)
    rows = read_rows(table)

    captioner = Captioner.load(exp, backend="ort", threads=args.threads)
    print("timing offline predict and the per-request baseline ...", flush=True)
    offline = offline_predict(captioner, table, warm, tmp / "offline.out", args.slots)
    single = per_request(captioner, rows, min(requests, rows_n))
    del captioner

    server = ServerProcess(exp, args.slots, args.threads, tmp / "serve.log")
    bodies = [(idx, json.dumps({"frames": frames, "idx": idx}).encode()) for idx, frames in rows]
    try:
        load_round(server.port, bodies, args.slots, args.slots)  # warm-up
        rounds = {}
        for c in levels:
            print(f"serving {max(requests, c)} requests from {c} clients ...", flush=True)
            rounds[c] = load_round(server.port, bodies, c, max(requests, c))
    finally:
        server.stop()
    report(args, cfg, exp, offline, single, rounds, rows_n)
    return 0


def report(args, cfg, exp, offline, single, rounds, rows_n) -> None:
    base_latency = statistics.median(single["latencies"])
    table = [["per-request Captioner", 1, len(single["latencies"]), single["rps"],
              1e3 * base_latency, 1e3 * percentile(single["latencies"], 99), 1.0,
              single["rps"] / offline["vps"], agreement(single["captions"], offline["captions"])],
             ["offline v2t predict", "-", rows_n, offline["vps"], "-", "-", offline["vps"] / single["rps"], 1.0,
              "identical"]]
    for c, r in rounds.items():
        table.append([f"v2t serve, {args.slots} slots", c, len(r["latencies"]), r["rps"],
                      1e3 * percentile(r["latencies"], 50), 1e3 * percentile(r["latencies"], 99),
                      r["rps"] / single["rps"], r["rps"] / offline["vps"], agreement(r["captions"], offline["captions"])])
    print(f"serve benchmark, model {describe(cfg)}, export {exp.name}, {rows_n} clips of {cfg.frame_num} "
          f"{args.frame_size} JPEG frames, threads {args.threads or 'all'}")
    print_table("Serving: requests/s and latency", ["mode", "clients", "requests", "requests/s", "p50 ms",
                                                    "p99 ms", "x per-request", "x offline predict",
                                                    "agreement"], table)
    print(f"frame encoder share of a per-request caption: {single['encode_share']:.0%}")
    if 32 in rounds:
        share = rounds[32]["rps"] / offline["vps"]
        print(f"target >= {TARGET_THROUGHPUT:.0%} of offline predict's videos/s at 32 clients: {share:.1%}")
    if 1 in rounds:
        ratio = percentile(rounds[1]["latencies"], 99) / base_latency
        print(f"target p99 at 1 client <= {TARGET_LATENCY:.2f}x a single offline caption: {ratio:.2f}x")


if __name__ == "__main__":
    sys.exit(main())

"""One GPU check (issue #10): v2t's `torch-fast` backend against eager PyTorch and the seed's
algorithm on the same GPU, in sections that each report even when another fails.

    bash benchmarks/gpu_check.sh              # on the GPU machine: install, gpu tests, then this
    python benchmarks/bench_gpu.py            # the sections alone (CUDA if there is one, else CPU)
    python benchmarks/bench_gpu.py --tiny     # the tiny model: checks the script anywhere, in a minute

Sections (every table has ratios against a baseline measured in the same section, same device):
  setup    a random-weight model of the seed's size (common.FULL), built on the device and saved
           once as a checkpoint; [PAD] never wins (common.never_end), so every caption is text_len
           tokens long and every method does the same work.
  encoder  frames/s of the ViT on uint8 crops (what predict feeds a backend): eager fp32 PyTorch
           (TF32 matmuls allowed, so the baseline is the fast form of fp32) vs torch-fast per
           precision. Both take host uint8 frames and normalize on the device.
  decoder  tokens/s of greedy captions: the seed's recompute loop (common.recompute_greedy, fp32,
           every step reruns the whole sequence) vs Captioner.generate_ids over torch-fast, fed
           frame embeddings directly (bench_decoder.PrefixFeed). tokens/s = batch x text_len / time;
           agreement is the share of tokens equal to the fp32 seed's (bf16 and fp16 differ).
  predict  videos/s end to end on a generated table of 320x240 JPEG frames: `v2t predict
           --backend torch-fast` (the real CLI, a subprocess) vs an EasyNLP-equivalent pipeline
           on the same GPU (serial PIL decoding, eager fp32 ViT, recompute decoder, batch 32).
           "job" counts from the first row read to the last written (model loading excluded),
           "steady" counts from the first 10% of rows to all but the last 10% (`steady_rate`);
           process time and start-up are beside them.

Time: the sections run in child processes (setup; encoder + decoder, which share the loaded
backends; predict), each killed at its limit: the smaller of its cap and what is left of
--budget, less what the later groups are owed. Inside a child, a section starts no new row once
its share of the time is spent. So a slow or failing section costs its own time only, and a
crashed CUDA context takes only its own child down. Tables go to stdout and to --report
(default $OUT/gpu_check.md when OUT is set, else ./gpu_check.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bench_decoder import PrefixFeed
from bench_encoder import vit_flops
from bench_input import clip_field
from common import (SEED, base_parser, describe, measure, never_end, print_table, recompute_greedy, setup,
                    synthetic_tokenizer)
from v2t_engine.concurrency import available_cores
from v2t_engine.config import ModelConfig
from v2t_engine.inputs.frames import FrameSource, row_frames_or_error
from v2t_engine.inputs.preprocess import CLIP_MEAN, CLIP_STD, normalize
from v2t_engine.inputs.tables import InputSchema, read_table
from v2t_engine.runtime.captioner import Captioner
from v2t_engine.runtime.generator import CaptionGenerator
from v2t_engine.runtime.search import SearchOptions
from v2t_training.checkpoint import is_checkpoint, read_checkpoint, save_checkpoint
from v2t_training.model import VideoCaptioner

SECTIONS = ("setup", "encoder", "decoder", "predict")
# One child process per group: encoder and decoder share the loaded torch-fast backends, whose
# loading (and any graph capture) may cost more than their rows.
GROUPS = (("setup",), ("encoder", "decoder"), ("predict",))
# Hard limit of each group's child (seconds), and what a group is owed when an earlier one runs
# long, by model size. Sized for an H100/H200 with the default rows; --budget bounds their sum.
CAPS = {"full": {"setup": 90, "encoder": 210, "predict": 180}, "tiny": {"setup": 60, "encoder": 120, "predict": 120}}
OWED = {"setup": 30, "encoder": 60, "predict": 60}
SCHEMA = "idx:str:1,imgbase64:str:1"
STEADY_FROM = 0.10  # "steady" videos/s leaves out this share of the first rows (warm-up, pipeline fill) and of the last
BURST_S = 0.0005  # rows written this close one after another were finished by one decoder step
FAST = "torch-fast"


def parse_args(argv: list[str] | None = None):
    parser = base_parser(__doc__)
    parser.set_defaults(repeats=5, max_seconds=None)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all sections together (default 330; 240 with --tiny)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="which sections to run")
    parser.add_argument("--report", type=Path, default=None, help="Markdown file the tables go to")
    parser.add_argument("--append", action="store_true", help="append to --report instead of replacing it")
    parser.add_argument("--precisions", default=None,
                        help="torch-fast precisions to time (default bf16,fp16 on cuda; fp32 on cpu, its only one)")
    parser.add_argument("--no-tf32", action="store_true", help="strict fp32 for the eager baselines")
    parser.add_argument("--encoder-frames", default=None, help="frames per encoder call (default 256; tiny 16)")
    parser.add_argument("--batch-sizes", default=None, help="decoder batches (default 64,128,256,512,1024; tiny 4,8)")
    parser.add_argument("--rows", type=int, default=None, help="rows v2t predict captions (default 16384; tiny 32)")
    parser.add_argument("--baseline-rows", type=int, default=None,
                        help="first rows the EasyNLP-equivalent captions (default 256; tiny 8)")
    parser.add_argument("--baseline-batch", type=int, default=32, help="the EasyNLP-equivalent's batch (EasyNLP's 32)")
    parser.add_argument("--slots", type=int, default=None, help="v2t predict --micro_batch_size (default 1024; tiny 8)")
    parser.add_argument("--workers", type=int, default=None, help="v2t predict --workers (default: every core)")
    parser.add_argument("--frame-size", default="320x240", help="width x height of the table's JPEG frames")
    parser.add_argument("--predict-backends", default=None,
                        help=f"v2t predict --backend values (default {FAST}; tiny: torch,{FAST})")
    # Set by the driver for its children: which sections, and when the child must be done.
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return resolve(parser.parse_args(argv))


def resolve(args):
    """Fill the defaults that depend on --tiny and on the machine."""
    tiny = args.tiny
    pick = lambda value, full, small: value if value is not None else (small if tiny else full)  # noqa: E731
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.budget = pick(args.budget, 330.0, 240.0)
    args.max_seconds = pick(args.max_seconds, 5.0, 1.0)
    args.encoder_frames = [int(n) for n in pick(args.encoder_frames, "256", "16").split(",")]
    args.batch_sizes = [int(b) for b in pick(args.batch_sizes, "64,128,256,512,1024", "4,8").split(",")]
    args.rows = pick(args.rows, 16384, 32)
    args.baseline_rows = min(args.rows, pick(args.baseline_rows, 256, 8))
    args.baseline_batch = args.baseline_batch if not tiny else min(args.baseline_batch, 4)
    args.slots = pick(args.slots, 1024, 8)
    args.workers = args.workers or available_cores()
    # TensorRT's rows run wherever it is installed (never yet on this project's machines).
    trt = ",trt" if importlib.util.find_spec("tensorrt") else ""
    args.predict_backends = pick(args.predict_backends, FAST + trt, f"torch,{FAST}").split(",")
    args.precisions = (args.precisions or ("bf16,fp16" if args.device == "cuda" else "fp32")).split(",")
    # Setup always runs: every other section reads its checkpoint, and it reuses one in --workdir.
    args.sections = ["setup", *(s for s in args.sections.split(",") if s and s != "setup")]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    if args.report is None:
        args.report = Path(os.environ["OUT"]) / "gpu_check.md" if os.environ.get("OUT") else Path("gpu_check.md")
    # A temporary workdir made here is removed when the driver ends; a given one is kept.
    args.own_workdir = args.workdir is None and not args.child
    if args.workdir is None:
        args.workdir = Path(tempfile.mkdtemp(prefix="v2t-bench-gpu-"))
    return args


# ---------------------------------------------------------------------------------------------
# The driver: one child process per group, each under its own time limit


def drive(args) -> int:
    start = time.monotonic()
    if not args.append:
        args.report.write_text("")
    cfg, _ = setup(args)
    # The device's name comes from the children: the driver stays off the GPU (no CUDA context
    # of its own, holding memory while they run).
    header = (f"\n## Benchmarks (bench_gpu.py)\n\ndevice {args.device}, torch "
              f"{torch.__version__}, eager baselines fp32{'' if args.no_tf32 else ' (TF32 matmuls on CUDA)'}, "
              f"budget {args.budget:.0f} s\n\nmodel {describe(cfg)}\n")
    _write(args.report, header)
    groups = [g for g in GROUPS if any(s in args.sections for s in g)]
    failed = []
    for i, group in enumerate(groups):
        name = group[0]
        left = args.budget - (time.monotonic() - start)
        limit = min(CAPS["tiny" if args.tiny else "full"][name], left - sum(OWED[g[0]] for g in groups[i + 1:]))
        if limit < OWED[name]:  # too little left for all: this group still gets its minimum first
            limit = min(left, OWED[name])
        if "setup" in failed:
            _note(args.report, f"{' + '.join(group)}: skipped, the setup section failed (no checkpoint)")
            failed.append(name)
            continue
        if limit < 10:
            _note(args.report, f"{' + '.join(group)}: skipped, {max(left, 0):.0f} s of the budget left")
            failed.append(name)
            continue
        if not _run_child(args, group, limit):
            failed.append(name)
    _note(args.report, f"sections done in {time.monotonic() - start:.0f} s"
          + (f"; failed or cut short: {', '.join(failed)}" if failed else ""))
    if args.own_workdir:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 1 if failed else 0


def _run_child(args, group: tuple[str, ...], limit: float) -> bool:
    """The sections of `group` in a child process, killed (with its own children: it leads a new
    process group) after `limit` seconds. True when it exited 0."""
    sections = [s for s in group if s in args.sections]
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--child", ",".join(sections),
           "--workdir", str(args.workdir), "--device", args.device, "--report", str(args.report),
           "--deadline", str(time.time() + limit - 5)]
    print(f"\n=== {' + '.join(sections)} (limit {limit:.0f} s) ===", flush=True)
    began = time.monotonic()
    child = subprocess.Popen(cmd, start_new_session=True)
    try:
        code = child.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        _note(args.report, f"{' + '.join(sections)}: killed at its {limit:.0f} s limit; "
                           "the rows above were finished before it")
        return False
    if code != 0:
        _note(args.report, f"{' + '.join(sections)}: exit status {code} after "
                           f"{time.monotonic() - began:.0f} s (errors above)")
    return code == 0


def _write(report: Path, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
    with open(report, "a", encoding="utf-8") as f:
        f.write(text)


def _note(report: Path, text: str) -> None:
    _write(report, f"\n- {text}\n")


# ---------------------------------------------------------------------------------------------
# In a child: what the sections share


class Bench:
    """A child's model, device, timing and report, with the eager model and torch-fast backends
    loaded once and shared by its sections."""

    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        self.cfg, self.workdir = setup(args)
        self.ck = self.workdir / "checkpoint"
        self.deadline = args.deadline or time.time() + args.budget
        self.section_end = self.deadline
        self._model: VideoCaptioner | None = None
        self._fast: dict[str, object] = {}
        self.load_s: dict[str, float] = {}  # how long each torch-fast backend took to load
        # Allowed for the eager baselines, so they run fp32 the fast way (TF32 tensor cores);
        # cuDNN's convolutions (the patch embedding) allow TF32 by default already.
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
        self.eager = "fp32 (TF32)" if self.device.type == "cuda" and not args.no_tf32 else "fp32"

    def start_section(self, sections_left: int) -> None:
        """This section's share of the child's time: an even split of what is left, so time one
        section did not use goes to the next."""
        self.section_end = time.time() + (self.deadline - time.time()) / max(1, sections_left)

    def expired(self) -> bool:
        return time.time() >= self.section_end

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, warmup=None, repeats: int | None = None):
        """common.measure with the device synchronized before each timer stops."""
        def synced(f):
            def call():
                out = f()
                self.sync()
                return out
            return call
        return measure(synced(fn), repeats or self.args.repeats, self.args.max_seconds,
                       warmup=synced(warmup) if warmup else None)

    def model(self) -> VideoCaptioner:
        """The eager fp32 model on the device, built on the meta device and given the checkpoint's
        tensors: no random initialisation of 400M parameters on the CPU just to overwrite them."""
        if self._model is None:
            cfg, _, state = read_checkpoint(self.ck)
            with torch.device("meta"):
                model = VideoCaptioner(cfg)
            model.load_state_dict(state, strict=True, assign=True)
            self._model = model.to(self.device).eval()
        return self._model

    def drop_model(self) -> None:
        """Free the eager model's device memory for a process that needs it more."""
        self._model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def fast(self, precision: str):
        """The torch-fast backend in `precision` (loaded once; a load error is kept and raised again)."""
        if precision not in self._fast:
            began = time.perf_counter()
            try:
                from v2t_training.fast_backend import FastTorchBackend
            except ImportError as err:
                self._fast[precision] = RuntimeError(f"no torch-fast backend in this tree ({err})")
            else:
                try:
                    self._fast[precision] = FastTorchBackend(self.ck, device=str(self.device), precision=precision)
                    self.load_s[precision] = time.perf_counter() - began
                except Exception as err:  # a load that fails costs its rows only
                    self._fast[precision] = RuntimeError(f"{FAST}/{precision} failed to load: {_brief(err)}")
        found = self._fast[precision]
        if isinstance(found, Exception):
            raise found
        return found

    def emit(self, title: str, headers: list[str], rows: list[list], notes: list[str]) -> None:
        """print_table's Markdown to stdout and to the report, notes under it."""
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            print_table(title, headers, rows)
            for line in notes:
                print(f"- {line}")
        _write(self.args.report, buf.getvalue())


def _brief(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) < 400 else text[:400] + " ..."


def _to_numpy(x) -> np.ndarray:
    return x.float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def _failed(width: int, *lead) -> list:
    return [*lead, *(["failed"] + ["-"] * (width - len(lead) - 1))]


# ---------------------------------------------------------------------------------------------
# Sections


def setup_section(b: Bench) -> None:
    """The checkpoint every other section reads; reused when --workdir already holds one of this
    config. Built on the device: random initialisation there takes a moment."""
    if b.device.type == "cuda":
        _note(b.args.report, f"GPU: {torch.cuda.get_device_name(b.device)}")
    began = time.perf_counter()
    if is_checkpoint(b.ck) and ModelConfig.load(b.ck) == b.cfg:
        b.emit("Setup", ["step", "seconds"], [["checkpoint reused", time.perf_counter() - began]], [str(b.ck)])
        return
    torch.manual_seed(SEED)
    with torch.device(b.device):
        model = never_end(VideoCaptioner(b.cfg).eval())
    b.sync()
    built = time.perf_counter()
    save_checkpoint(b.ck, model, synthetic_tokenizer(b.cfg.vocab_size, b.workdir / "vocab"))
    size = sum(p.stat().st_size for p in b.ck.iterdir()) / 2 ** 30
    b.emit("Setup", ["step", "seconds"],
           [["build the random model on the device", built - began],
            [f"save the checkpoint ({size:.2f} GiB)", time.perf_counter() - built]], [str(b.ck)])


@torch.inference_mode()
def eager_encode(vit: torch.nn.Module, frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host uint8 crops → embeddings on the device: the same work a backend's encode_frames does."""
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    pixels = torch.from_numpy(frames).to(device, non_blocking=True).float().div_(255)
    return vit((pixels - mean) / std, every_token=True)  # the whole last block, as CLIP runs it


def encoder_section(b: Bench) -> None:
    cfg, headers = b.cfg, ["frames", "method", "precision", "frames/s", "x eager fp32", "TFLOP/s",
                           "max rel diff", "runs"]
    flops = vit_flops(cfg)
    vit = b.model().first_stage_model
    rows, notes = [], []
    for n in b.args.encoder_frames:
        if b.expired():
            notes.append(f"{n} frames: skipped, the section's time was spent")
            continue
        frames = np.random.default_rng(n).integers(0, 256, (n, 3, cfg.img_size, cfg.img_size), dtype=np.uint8)
        base = b.timed(lambda: eager_encode(vit, frames, b.device))
        ref = _to_numpy(base.result)

        def row(method, precision, t):
            fps = n / t.median_s
            rel = float(np.abs(_to_numpy(t.result) - ref).max() / np.abs(ref).max())
            return [n, method, precision, fps, base.median_s / t.median_s, fps * flops / 1e12, f"{rel:.1e}", t.runs]

        rows.append(row("eager", b.eager, base))
        for p in b.args.precisions:
            if b.expired():
                notes.append(f"{n} frames, {FAST}/{p}: skipped, the section's time was spent")
                continue
            try:
                backend = b.fast(p)
                first = _first_call_s(b, lambda: backend.encode_frames(frames))
                rows.append(row(f"v2t {FAST}", p, b.timed(lambda: backend.encode_frames(frames))))
                notes.append(f"{n} frames, {FAST}/{p}: first call {first:.1f} s (the compile, when it compiles)")
            except Exception as err:
                rows.append(_failed(len(headers), n, f"v2t {FAST}", p))
                notes.append(f"{n} frames, {FAST}/{p}: {_brief(err)}")
        if not b.expired():
            p = b.args.precisions[0]
            rows.append(row(f"v2t {FAST}, ViT not compiled", p, _uncompiled_encoder(b, p, frames)))
        if not b.expired() and b.device.type == "cuda":
            p = b.args.precisions[0]
            try:
                rows.append(row(f"v2t {FAST}, ViT compiled as one graph", p, _graph_compiled_encoder(b, p, frames, notes)))
            except Exception as err:
                notes.append(f"{n} frames, ViT compiled as one graph: {_brief(err)}")
    notes.append(f"{flops / 1e9:.3g} GFLOP per frame; input: host uint8 crops, normalized on the device")
    notes += [f"{FAST}/{p} loaded from the checkpoint in {s:.1f} s" for p, s in b.load_s.items()]
    b.emit(f"Frame encoder on {b.device.type} (ViT {cfg.vit_width}w x {cfg.vit_layers}, {cfg.img_size} px)",
           headers, rows, notes)


def _uncompiled_encoder(b: Bench, precision: str, frames: np.ndarray):
    """torch-fast's encoder with its eager ViT instead of the compiled one: what compiling buys."""
    backend = b.fast(precision)

    def run():
        with torch.inference_mode():
            return backend.model.first_stage_model(backend.device_frames(frames).to(backend.dtype)).float()

    return b.timed(run)


def _first_call_s(b: Bench, fn) -> float:
    began = time.perf_counter()
    fn()
    b.sync()
    return time.perf_counter() - began


def _graph_compiled_encoder(b: Bench, precision: str, frames: np.ndarray, notes: list[str]):
    """torch-fast's encoder with the whole ViT compiled as one graph (V2T_TORCH_COMPILE=graph)
    instead of block by block: its first call and its frames/s."""
    from v2t_training.fast_backend import ENCODER_CHUNK

    backend = b.fast(precision)
    whole = torch.compile(backend.model.first_stage_model, dynamic=False)

    def run():
        with torch.inference_mode():
            x = backend.device_frames(frames).to(backend.dtype)
            return torch.cat([whole(x[i:i + ENCODER_CHUNK]) for i in range(0, len(x), ENCODER_CHUNK)]).float()

    notes.append(f"{len(frames)} frames, ViT compiled as one graph, {precision}: first call {_first_call_s(b, run):.1f} s")
    return b.timed(run)


class DevicePrefixFeed(PrefixFeed):
    """PrefixFeed for a backend that may keep frame embeddings where its decoder runs: the
    embeddings fed in place of pixels take the type, device and dtype of what the backend's own
    encode_frames returns, which is what its slot decoder's prefill is written for."""

    def __init__(self, backend, cfg: ModelConfig):
        super().__init__(backend)
        self._like = backend.encode_frames(np.zeros((1, 3, cfg.img_size, cfg.img_size), np.uint8))

    def encode_frames(self, frames: np.ndarray):
        like = self._like
        if isinstance(like, torch.Tensor):
            return torch.from_numpy(np.ascontiguousarray(frames)).to(like.device, like.dtype)
        return np.asarray(frames, dtype=like.dtype)


def run_generator(gen: CaptionGenerator, prefix: np.ndarray, steps: int) -> np.ndarray:
    """Every video of `prefix` (B, F, E) through a generator with B free slots → tokens (B, steps)."""
    gen.add([(i, video) for i, video in enumerate(prefix)])
    out = np.empty((len(prefix), steps), np.int64)
    while not gen.is_done():
        for i, ids in gen.generate_next_token():
            out[i] = ids[0]
    return out


def decoder_methods(b: Bench, precision: str, B: int):
    """(name, fn(host prefix) → tokens (B, steps)) of v2t at batch B: Captioner.generate_ids, which
    makes a generator (and its slot decoder: cache, CUDA graphs) per call, and one CaptionGenerator
    kept across calls, as predict keeps one for a whole job."""
    cfg, steps = b.cfg, b.cfg.text_len
    feed = DevicePrefixFeed(b.fast(precision), cfg)
    cap, gen = Captioner(feed), CaptionGenerator(feed, SearchOptions(), steps, slots=B)
    return [(f"v2t {FAST}: generate_ids", lambda p: cap.generate_ids(p)[:, 0]),
            (f"v2t {FAST}: generator kept", lambda p: run_generator(gen, p, steps)),
            (f"v2t {FAST}: slot decoder alone", slot_decoder_alone(feed, B, steps))]


def slot_decoder_alone(feed: DevicePrefixFeed, B: int, steps: int):
    """Greedy steps straight on the backend's slot decoder, without the generator's bookkeeping
    (search, slot states): how much of a step is the device's work and the ids' transfer."""
    dec, rows, live = None, np.arange(B), np.ones(B, bool)

    def run(prefix: np.ndarray) -> np.ndarray:
        nonlocal dec
        if dec is None:
            dec = feed._backend.slot_decoder(B, prefix.shape[1], steps)
        dec.prefill(rows, feed.encode_frames(prefix.reshape(-1, prefix.shape[-1])).reshape(prefix.shape), rows)
        out = np.empty((B, steps), np.int64)
        for t in range(steps):
            out[:, t] = dec.argmax(rows)
            if t + 1 < steps:
                dec.step(out[:, t], live)
        return out
    return run


def decoder_section(b: Bench) -> None:
    cfg, steps = b.cfg, b.cfg.text_len
    headers = ["batch", "method", "precision", "tokens/s", "ms/caption", "x seed", "agreement", "runs"]
    model, rows, notes = b.model(), [], []
    for B in b.args.batch_sizes:
        if b.expired():
            notes.append(f"batch {B}: skipped, the section's time was spent")
            continue
        prefix = torch.randn(B, cfg.frame_num, cfg.n_embd, generator=torch.Generator().manual_seed(B))
        on_device, host = prefix.to(b.device), prefix.numpy()
        seed = b.timed(lambda: recompute_greedy(model, on_device, steps))
        seed_tokens = seed.result.cpu().numpy()

        def row(method, precision, t, agree):
            return [B, method, precision, B * steps / t.median_s, 1000 * t.median_s / B,
                    seed.median_s / t.median_s, "identical" if agree == 1.0 else f"{agree:.2%}", t.runs]

        rows.append(row("seed (recompute)", b.eager, seed, 1.0))
        for p in b.args.precisions:
            if b.expired():
                notes.append(f"batch {B}, {FAST}/{p}: skipped, the section's time was spent")
                continue
            try:
                for name, fn in decoder_methods(b, p, B):
                    t = b.timed(lambda: fn(host))
                    rows.append(row(name, p, t, float((t.result == seed_tokens).mean())))
            except Exception as err:
                rows.append(_failed(len(headers), B, f"v2t {FAST}", p))
                notes.append(f"batch {B}, {FAST}/{p}: {_brief(err)}")
    notes.append(f"greedy captions of {steps} tokens ([PAD] never wins), frame embeddings fed in place of "
                 "pixels; agreement: share of tokens equal to the seed's at the same batch (random weights "
                 "make near-ties, so 16-bit rows differ)")
    b.emit(f"Decoder on {b.device.type}: greedy captions, seed's loop vs v2t's generator", headers, rows, notes)


# ---------------------------------------------------------------------------------------------
# The predict section


def make_tables(b: Bench) -> dict[str, Path]:
    """rows.txt (--rows rows), base.txt (its first --baseline-rows) and warm.txt (other clips, one
    baseline batch). The first rows are distinct clips; later rows repeat them, which costs a
    decoder the same as new ones. Made in worker processes (fork, before this process touches
    CUDA) since JPEG encoding of thousands of frames on one core would take a minute."""
    a, cfg = b.args, b.cfg
    size = tuple(int(v) for v in a.frame_size.split("x"))
    distinct = min(a.rows, max(a.baseline_rows, 512))
    fields_of = partial(clip_field, frame_num=cfg.frame_num, size=size)
    ids = [*range(distinct), *range(distinct, distinct + a.baseline_batch)]
    with ProcessPoolExecutor(available_cores(), mp_context=multiprocessing.get_context("fork")) as pool:
        fields = list(pool.map(fields_of, ids, chunksize=8))
    out = {name: b.workdir / f"{name}.txt" for name in ("rows", "base", "warm")}
    lines = [f"v{i:06d}\t{fields[i % distinct]}\n" for i in range(a.rows)]
    out["rows"].write_text("".join(lines), encoding="utf-8")
    out["base"].write_text("".join(lines[:a.baseline_rows]), encoding="utf-8")
    out["warm"].write_text("".join(f"w{i:06d}\t{f}\n" for i, f in enumerate(fields[distinct:])), encoding="utf-8")
    return out


@torch.inference_mode()
def easynlp_equivalent(model: VideoCaptioner, tokenizer, table: Path, out: Path, batch: int,
                       device: torch.device) -> None:
    """EasyNLP's predict on the device: frames decoded one row after another on the CPU and
    normalized there, the eager fp32 ViT, the seed's recompute decoder, `batch` rows at a time."""
    cfg = model.cfg
    rows = list(read_table(table, InputSchema.parse(SCHEMA)))
    with open(out, "w", encoding="utf-8") as f:
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            pixels = np.stack([row_frames_or_error(r, "imgbase64", cfg.frame_num, cfg.img_size, FrameSource())[0]
                               for r in chunk])  # (B, F, 3, S, S) uint8
            frames = torch.from_numpy(normalize(pixels)).to(device).flatten(0, 1)  # (B*F, 3, S, S)
            prefix = model.first_stage_model(frames, every_token=True).view(len(chunk), cfg.frame_num, -1)  # (B, F, E)
            tokens = recompute_greedy(model, prefix, cfg.text_len).cpu()
            for row, ids in zip(chunk, tokens.tolist()):
                f.write(f"{row.idx}\t{json.dumps([tokenizer.decode(ids)], ensure_ascii=False)}\n")


# The v2t CLI with predict_tables wrapped: when each row was written, when the job began and
# ended (model loading excluded), and the PredictReport's fields (input_wait_s among them where
# predict reports it), written as JSON to $V2T_BENCH_TIMES.
_CLI_TIMED = """
import json, os, runpy, sys, time
started = time.time()
import v2t_engine.jobs.predict as job
real, times = job.predict_tables, {"started": started, "rows": []}
def timed(*args, progress=None, **kwargs):
    def tick(n=1):
        times["rows"].append([time.time(), n])
        if progress is not None:
            progress(n)
    times["job_started"] = time.time()
    report = real(*args, progress=tick, **kwargs)
    times["job_ended"] = time.time()
    times["report"] = {k: v for k, v in vars(report).items() if isinstance(v, (int, float, str, type(None)))}
    with open(os.environ["V2T_BENCH_TIMES"], "w") as out:
        json.dump(times, out)
    return report
job.predict_tables = timed
sys.argv[0] = "v2t"
runpy.run_module("v2t_engine.cli", run_name="__main__", alter_sys=True)
"""


def v2t_predict(b: Bench, backend: str, table: Path, out: Path, model_dir: Path | None = None) -> dict:
    """`v2t predict` in a subprocess → its timings (see _CLI_TIMED). RuntimeError when it fails."""
    from v2t_engine.cli.predict import predict_command

    a = b.args
    cmd = [sys.executable, "-c", _CLI_TIMED, "predict", "--tables", str(table), "--outputs", str(out),
           "--checkpoint_dir", str(model_dir or b.ck), "--input_schema", SCHEMA, "--first_sequence", "imgbase64",
           "--micro_batch_size", str(a.slots), "--workers", str(a.workers), "--backend", backend,
           "--device", b.device.type]
    # The first precision where predict takes --precision (else the backend's default).
    precision = a.precisions[0] if backend == FAST and "precision" in {p.name for p in predict_command.params} else None
    if precision:
        cmd += ["--precision", precision]
    times_file = b.workdir / f"times-{backend}.json"
    times_file.unlink(missing_ok=True)
    samples = b.workdir / f"gpu-busy-{backend}.csv"
    samples.unlink(missing_ok=True)
    began = time.time()
    with gpu_utilization(samples):
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "V2T_BENCH_TIMES": str(times_file)},
                              timeout=max(10.0, b.section_end - time.time()))
    wall = time.time() - began
    if proc.returncode != 0 or not times_file.exists():
        raise RuntimeError(f"v2t predict exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    t = json.loads(times_file.read_text())
    done = np.cumsum([n for _, n in t["rows"]])
    window = steady_window([s for s, _ in t["rows"]], done)
    sampled = samples.read_text() if samples.exists() else ""
    busy = [busy_share(sampled, t["job_started"], t["job_ended"]),
            busy_share(sampled, *window[:2]) if window else None]
    job_s = t["job_ended"] - t["job_started"]
    return {"job_s": job_s, "steady": window[2] / (window[1] - window[0]) if window else None, "busy": busy,
            "wall_s": wall, "startup_s": t["job_started"] - began,
            "report": t["report"], "precision": precision or "default", "written": int(done[-1]) if len(done) else 0,
            "flags": " ".join(cmd[cmd.index("--micro_batch_size"):])}


def steady_window(stamps: list[float], done: np.ndarray) -> tuple[float, float, int] | None:
    """(start, end, rows written between): from the row that completes the first STEADY_FROM of
    them to the one that completes all but the last STEADY_FROM (None for too few rows). Each end
    is moved to the last row of its burst: rows written each within BURST_S of the one before
    were finished by one decoder step (captions of one length finish together), and a burst
    counts with its time or not at all. The end before the last rows matters as much as the
    start: a pipeline that encodes ahead holds work done for later rows at any point of a job but
    its end, where it has drained, so a window up to the last row would count rows whose encoding
    it never timed."""
    def burst_end(i: int) -> int:
        while i + 1 < len(stamps) and stamps[i + 1] - stamps[i] < BURST_S:
            i += 1
        return i

    total = int(done[-1]) if len(done) else 0
    a = burst_end(int(np.searchsorted(done, max(1, int(STEADY_FROM * total)))))
    b = burst_end(int(np.searchsorted(done, int((1 - STEADY_FROM) * total))))
    if b <= a or stamps[b] <= stamps[a]:
        return None
    return stamps[a], stamps[b], int(done[b] - done[a])


@contextlib.contextmanager
def gpu_utilization(path: Path) -> Iterator[None]:
    """Samples of the GPU's utilization (nvidia-smi: the share of each sample period in which a
    kernel ran) written to `path` every 100 ms while the block runs; nothing where there is no
    nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        yield
        return
    with open(path, "w") as out:
        sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits",
                                    "-lms", "100", "-i", "0"], stdout=out, stderr=subprocess.DEVNULL)
        try:
            yield
        finally:
            sampler.terminate()
            sampler.wait(timeout=10)


def busy_share(samples: str, start: float, end: float) -> float | None:
    """Mean GPU utilization (0-1) of nvidia-smi's samples (`timestamp, percent` lines; local
    time, as time.time() counts) taken between `start` and `end`; None without any."""
    values = []
    for line in samples.splitlines():
        try:
            stamp, percent = (field.strip() for field in line.split(","))
            when = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
            value = float(percent)
        except ValueError:
            continue  # a header, a partial last line or "[N/A]"
        if start <= when <= end:
            values.append(value / 100)
    return float(np.mean(values)) if values else None


def _captions(path: Path) -> dict[str, str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return {line.split("\t")[0]: line.split("\t")[1] for line in lines}


def time_baseline(b: Bench, tables: dict[str, Path]) -> tuple[float, dict[str, str]]:
    """The EasyNLP-equivalent's videos/s on the baseline rows, and its captions by idx. One timed
    run after a one-batch warm-up: it takes seconds, and is steady batch after batch."""
    model, tokenizer, out = b.model(), read_checkpoint(b.ck, weights=False)[1], b.workdir / "base.out"

    def run(table: Path) -> None:
        easynlp_equivalent(model, tokenizer, table, out, b.args.baseline_batch, b.device)

    base = b.timed(lambda: run(tables["base"]), warmup=lambda: run(tables["warm"]), repeats=1)
    return b.args.baseline_rows / base.median_s, _captions(out)


def predict_section(b: Bench) -> None:
    from v2t_engine.runtime.backends import backend_names

    a = b.args
    headers = ["pipeline", "rows", "videos/s (job)", "videos/s (steady)", "x EasyNLP (job)", "x EasyNLP (steady)",
               "process s", "start-up s", "input wait", "GPU busy (job / steady)", "agreement"]
    began = time.perf_counter()
    tables = make_tables(b)  # before any CUDA work here: the table makers are forked
    notes = [f"table: {a.rows} rows of {b.cfg.frame_num} {a.frame_size} JPEG frames, made in "
             f"{time.perf_counter() - began:.1f} s"]
    # EasyNLP runs PyTorch's defaults: fp32 matmuls without TF32 (cuDNN's convolutions allow it).
    # That is the baseline the ratios are taken against; the TF32 row shows what the fast form
    # of fp32 would give it.
    rows, base_rate, base_caps = [], None, None
    for tf32 in (False, True) if b.device.type == "cuda" else (False,):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        rate, caps = time_baseline(b, tables)
        base_rate, base_caps = (rate, caps) if base_rate is None else (base_rate, base_caps)
        label = "TF32 matmuls" if tf32 else "fp32 matmuls, as EasyNLP runs"
        rows.append([f"EasyNLP-equivalent (batch {a.baseline_batch}, {label})", a.baseline_rows, rate, rate,
                     rate / base_rate, rate / base_rate, "-", "-", "-", "-", "identical" if caps == base_caps else
                     f"{np.mean([caps.get(k) == v for k, v in base_caps.items()]):.1%}"])
    torch.backends.cuda.matmul.allow_tf32 = not a.no_tf32
    b.drop_model()  # v2t predict, a separate process, loads its own
    if importlib.util.find_spec("tensorrt") is None:
        notes.append("v2t predict --backend trt: skipped, no tensorrt module on this machine")
    for backend in a.predict_backends:
        name = f"v2t predict --backend {backend}"
        if backend not in backend_names():
            notes.append(f"{name}: skipped, not registered (installed: {', '.join(backend_names())})")
            continue
        if b.expired():
            notes.append(f"{name}: skipped, the section's time was spent")
            continue
        try:
            model_dir = _trt_export(b, notes) if backend == "trt" else None
            r = v2t_predict(b, backend, tables["rows"], b.workdir / f"{backend}.out", model_dir)
        except Exception as err:
            rows.append(_failed(len(headers), name, a.rows))
            notes.append(f"{name}: {_brief(err)}")
            continue
        rows.append(_predict_row(f"{name} ({r['precision']})", a.rows, r, base_rate, base_caps,
                                 _captions(b.workdir / f"{backend}.out")))
        notes.append(f"{name}: v2t predict ... {r['flags']}")
    notes.append("agreement: share of the baseline's rows whose caption v2t wrote identically; "
                 "input wait: share of the job the model waited on decoded rows (predict's input_wait_s); "
                 "GPU busy: mean of nvidia-smi's utilization, sampled every 100 ms, over the job and over "
                 "the steady window (n/a without nvidia-smi)")
    b.emit(f"End to end on {b.device.type}: table in, captions out", headers, rows, notes)


def _trt_export(b: Bench, notes: list[str]) -> Path:
    """`v2t export --format trt` of the checkpoint (engines for predict's slots), timed in a note."""
    out = b.workdir / "trt"
    precision = b.args.precisions[0]
    cmd = [sys.executable, "-c", "from v2t_engine.cli import main; main()", "export", "--checkpoint_dir", str(b.ck),
           "--format", "trt",
           "--output", str(out), "--precision", precision, "--max_batch", str(b.args.slots)]
    began = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=max(10.0, b.section_end - time.time()))
    if proc.returncode != 0:
        raise RuntimeError(f"v2t export --format trt exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    notes.append(f"v2t export --format trt --precision {precision}: {time.time() - began:.0f} s")
    return out


def _predict_row(name: str, n: int, r: dict, base_rate: float, base_caps: dict, caps: dict) -> list:
    job_rate = n / r["job_s"]
    steady = r["steady"] or job_rate
    # Predict's own wall time for the share where it reports one: the same span as input_wait_s.
    wait, span = r["report"].get("input_wait_s"), r["report"].get("wall_s") or r["job_s"]
    same = [caps.get(k) == v for k, v in base_caps.items()]
    agree = float(np.mean(same)) if same else float("nan")
    busy = " / ".join("n/a" if share is None else f"{share:.0%}" for share in r["busy"])
    return [name, r["written"], job_rate, steady, job_rate / base_rate, steady / base_rate, r["wall_s"],
            r["startup_s"], f"{wait / span:.0%}" if isinstance(wait, (int, float)) else "n/a", busy,
            "identical" if agree == 1.0 else f"{agree:.1%}"]


# ---------------------------------------------------------------------------------------------


def run_child(args) -> int:
    b = Bench(args)
    sections = [s for s in args.child.split(",") if s]
    status = 0
    for i, name in enumerate(sections):
        b.start_section(len(sections) - i)
        print(f"--- {name} ---", flush=True)
        began = time.perf_counter()
        try:
            SECTION_FUNCS[name](b)
        except Exception as err:  # one section's failure must not cost the others their report
            traceback.print_exc()
            _note(args.report, f"{name}: failed after {time.perf_counter() - began:.0f} s: {_brief(err)}")
            status = 1
        else:
            print(f"{name} took {time.perf_counter() - began:.1f} s", flush=True)
    return status


SECTION_FUNCS = {"setup": setup_section, "encoder": encoder_section, "decoder": decoder_section,
                 "predict": predict_section}


def main() -> int:
    args = parse_args()
    return run_child(args) if args.child else drive(args)


if __name__ == "__main__":
    sys.exit(main())

"""Frame encoder throughput: eager PyTorch vs every v2t backend and precision, with the share of
the machine's GEMM rate each one reaches.

    python benchmarks/bench_encoder.py            # CLIP ViT-L/14 shapes, random weights
    python benchmarks/bench_encoder.py --tiny     # the same code in seconds

Rows:
  eager fp32    the model's PyTorch forward (what EasyNLP runs), the baseline.
  eager bf16    the same in bfloat16: a reference for what bf16 gives on this CPU. v2t has no bf16
                export because ONNX Runtime's CPU provider has no bf16 kernels (export/quantize.py).
  v2t torch     v2t's PyTorch reference backend.
  v2t ort/P     v2t's ONNX Runtime backend on the `v2t export --precision P` graphs.

GEMM rates are measured in the same run with PyTorch on square matrices (fp32 and bf16 matmul,
int8 `torch._int_mm`); a row's "of GEMM peak" is its useful work (the ViT's multiply-adds x 2,
counted from the config) per second over the rate of its precision. `max rel diff` is the largest
difference from eager fp32's embeddings, relative to their largest magnitude.
"""
from __future__ import annotations

import copy
import sys
import time

import numpy as np
import torch

from common import base_parser, checkpoint, describe, export, load_eager, measure, print_table, setup
from v2t_engine.runtime.captioner import Captioner
from v2t_engine.config import ModelConfig
from v2t_engine.inputs.preprocess import normalize

TARGET_FRAMES_S = 2.5
# The precision whose GEMM rate bounds each row.
GEMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
# int8_encoder quantizes exactly the graph measured here, so the int8 rate bounds it too.
RATE_OF = {"fp32": "fp32", "bf16": "bf16", "int8": "int8", "int8_encoder": "int8"}


def vit_flops(cfg: ModelConfig) -> float:
    """Floating-point operations (2 per multiply-add) of one frame through the whole ViT, as the
    eager baselines run it. v2t's last block computes the class token alone (model.py), so its
    TFLOP/s columns count this same work per frame: a rate of frames, not of its arithmetic."""
    T, W = cfg.img_len + 1, cfg.vit_width
    patches = 2 * cfg.img_len * 3 * cfg.vit_patch_size ** 2 * W
    # Per layer: q, k, v and output projections (4 W^2), MLP (8 W^2) per token; scores and
    # weighted values (2 T W) per token.
    layer = 2 * T * 12 * W * W + 2 * 2 * T * T * W
    proj = 2 * W * cfg.n_embd if cfg.vit_has_proj else 0
    return patches + cfg.vit_layers * layer + proj


def gemm_rate(dtype: torch.dtype, n: int, repeats: int) -> float:
    """Operations per second of an n x n x n matrix product in `dtype`, median of `repeats`."""
    if dtype == torch.int8:
        a = torch.randint(-100, 100, (n, n), dtype=torch.int8)
        b = torch.randint(-100, 100, (n, n), dtype=torch.int8)
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        fn = lambda: a @ b  # noqa: E731
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / float(np.median(times))


@torch.inference_mode()
def eager(vit: torch.nn.Module, frames: torch.Tensor) -> np.ndarray:
    return vit(frames, every_token=True).float().numpy()  # the whole last block, as CLIP runs it


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--frames", type=int, default=8, help="frames per encoder call")
    parser.add_argument("--precisions", default="fp32,int8_encoder", help="v2t export precisions to run")
    parser.add_argument("--gemm-size", type=int, default=None, help="matrix size for the GEMM rates "
                        "(default 2048; 512 with --tiny)")
    args = parser.parse_args()
    cfg, workdir = setup(args)
    ck = checkpoint(cfg, workdir)
    precisions = args.precisions.split(",")
    # uint8 crops, as predict hands them to a backend; the eager baselines get them normalized.
    pixels = np.random.default_rng(0).integers(0, 256, (args.frames, 3, cfg.img_size, cfg.img_size), dtype=np.uint8)
    frames = torch.from_numpy(normalize(pixels))
    vit = load_eager(ck).first_stage_model

    runs = [("eager fp32", "fp32", lambda: eager(vit, frames)),
            ("eager bf16", "bf16", lambda v=copy.deepcopy(vit).to(torch.bfloat16): eager(v, frames.to(torch.bfloat16)))]
    captioners = [("v2t torch", "fp32", Captioner.load(ck, backend="torch", threads=args.threads))]
    captioners += [(f"v2t ort/{p}", p, Captioner.load(export(ck, p), backend="ort", threads=args.threads))
                   for p in precisions]
    runs += [(name, p, lambda cap=cap: cap.backend.encode_frames(pixels)) for name, p, cap in captioners]

    n = args.gemm_size or (512 if args.tiny else 2048)
    rates = {p: gemm_rate(dtype, n, args.repeats) for p, dtype in GEMM_DTYPES.items()}
    flops = vit_flops(cfg)
    rows, base = [], None
    for name, precision, fn in runs:
        t = measure(fn, args.repeats, args.max_seconds)
        base = base or (t, t.result)
        fps = args.frames / t.median_s
        rel = float(np.abs(t.result - base[1]).max() / np.abs(base[1]).max())
        rows.append([name, precision, fps, fps / (args.frames / base[0].median_s),
                     f"{fps * flops / rates[RATE_OF[precision]]:.0%}", f"{rel:.1e}", t.runs])

    print(f"encoder benchmark, model {describe(cfg)}, {args.frames} frames per call, "
          f"{flops / 1e9:.3g} GFLOP per frame")
    print("GEMM rates (n=%d): %s" % (n, ", ".join(f"{p} {r / 1e9:,.0f} G/s" for p, r in rates.items())))
    print_table("Frame encoder", ["method", "precision", "frames/s", "x eager fp32", "of GEMM peak",
                                  "max rel diff", "runs"], rows)
    best = max((r for r in rows if r[0].startswith("v2t")), key=lambda r: r[2])
    print(f"target >= {TARGET_FRAMES_S:g} frames/s: {best[2]:.2f} ({best[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Caption decoder throughput: the seed's algorithm vs eager PyTorch with a KV cache vs every v2t
backend and precision, at several batch sizes.

    python benchmarks/bench_decoder.py            # the seed's full-size model, random weights
    python benchmarks/bench_decoder.py --tiny     # the same code in seconds

Methods, all greedy:
  seed          EasyNLP's predict loop (EASYNLP.md §7, greedy instead of top-k sampling): eager
                PyTorch recomputing the whole sequence at every step, no KV cache.
  eager+cache   eager PyTorch, the model's own forward with its KV cache.
  v2t torch     v2t's PyTorch reference backend driven by v2t's generator.
  v2t ort/P     v2t's ONNX Runtime backend on the `v2t export --precision P` graphs.
The v2t rows run Captioner.generate_ids, fed the frame embeddings directly (PrefixFeed), so they
time v2t's generator and decoder and nothing else.

Rule for random weights: [PAD], the end token, is made to lose every step (common.never_end), so
every method writes exactly text_len tokens per caption and tokens/s compare like for like. The
frame prefix is random (standard normal) so that each row's caption differs. Tokens per second
count batch x text_len generated tokens; ms per caption is the batch's time over its size.
Agreement is the fraction of tokens equal to the seed's at the same batch: fp32 methods must
agree exactly (the script exits 1 otherwise), lower precisions report theirs.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from common import (base_parser, checkpoint, describe, export, load_eager, measure, print_table,
                    recompute_greedy, setup, validation)
from v2t_engine.runtime.captioner import Captioner

TARGET_SPEEDUP_AT_8 = 15.0
TARGET_TOKENS_S = 1000.0


@torch.no_grad()
def cached_greedy(model, prefix: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with the KV cache: prefill the frames, then one token per step."""
    dec = model.transformer
    empty = torch.zeros(prefix.shape[0], 0, dtype=torch.long)
    logits, past = dec(empty, prefix_embeds=prefix, last_only=True)  # (B, V)
    tokens = [logits.argmax(-1)]
    for _ in range(steps - 1):
        logits, past = dec(tokens[-1][:, None], past=past, last_only=True)
        tokens.append(logits.argmax(-1))
    return torch.stack(tokens, dim=1)  # (B, steps)


class PrefixFeed:
    """A v2t backend whose encode_frames passes its input through, so v2t's own generator can be fed
    frame embeddings (B, F, E) in place of pixels and timed without the frame encoder. Every
    other attribute is the wrapped backend's."""

    def __init__(self, backend):
        self._backend = backend

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        return frames

    def __getattr__(self, name: str):
        return getattr(self._backend, name)


def decoder_only(captioner: Captioner) -> Captioner:
    return Captioner(PrefixFeed(captioner.backend), captioner.tokenizer)


def methods(ck, precisions, threads):
    """(name, precision, fn(prefix tensor) → tokens numpy) for every method but the seed's."""
    model = load_eager(ck)
    steps = model.cfg.text_len
    found = [("eager+cache", "fp32", lambda p: cached_greedy(model, p, steps).numpy())]
    captioners = [("v2t torch", "fp32", Captioner.load(ck, backend="torch", threads=threads))]
    captioners += [(f"v2t ort/{p}", p, Captioner.load(export(ck, p), backend="ort", threads=threads))
                   for p in precisions]
    for name, precision, cap in captioners:
        fast = decoder_only(cap)
        found.append((name, precision, lambda p, fast=fast: fast.generate_ids(p.numpy())[:, 0]))
    return model, found


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--precisions", default="fp32,int8",
                        help="v2t export precisions to run (int8_encoder's decoder is the fp32 one)")
    args = parser.parse_args()
    cfg, workdir = setup(args)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    ck = checkpoint(cfg, workdir)
    precisions = args.precisions.split(",")
    model, others = methods(ck, precisions, args.threads)
    steps = cfg.text_len

    rows, disagreeing = [], []
    for B in batches:
        prefix = torch.randn(B, cfg.frame_num, cfg.n_embd, generator=torch.Generator().manual_seed(B))
        seed = measure(lambda: recompute_greedy(model, prefix, steps).numpy(), args.repeats, args.max_seconds)
        rows.append(_row(B, steps, "seed (recompute)", seed.median_s, seed.median_s, 1.0, seed.runs))
        for name, precision, fn in others:
            t = measure(lambda: fn(prefix), args.repeats, args.max_seconds)
            agree = float((t.result == seed.result).mean())
            if precision == "fp32" and agree < 1.0:
                disagreeing.append(f"{name} at batch {B}")
            rows.append(_row(B, steps, name, t.median_s, seed.median_s, agree, t.runs))

    print(f"decoder benchmark, model {describe(cfg)}")
    print_table("Decoder: greedy captions of text_len tokens (random weights, [PAD] never chosen)",
                ["batch", "method", "tokens/s", "ms/caption", "x seed", "agreement", "runs"], rows)
    for precision in precisions:
        print(f"export validation ({precision}): {validation(export(ck, precision))}")
    _print_targets(rows)
    if disagreeing:
        print("ERROR: fp32 methods whose greedy tokens differ from the seed's: " + ", ".join(disagreeing))
        return 1
    return 0


def _row(B: int, steps: int, name: str, seconds: float, seed_seconds: float, agree: float, runs: int) -> list:
    agreement = "identical" if agree == 1.0 else f"{agree:.2%}"
    return [B, name, B * steps / seconds, 1000 * seconds / B, seed_seconds / seconds, agreement, runs]


def _print_targets(rows: list[list]) -> None:
    """The issue's targets, for the fastest v2t row."""
    v2t = [r for r in rows if r[1].startswith("v2t")]
    at_8 = [r for r in v2t if r[0] == 8]
    if at_8:
        r = max(at_8, key=lambda r: r[4])
        print(f"target >= {TARGET_SPEEDUP_AT_8:g}x the seed at batch 8: {r[4]:.1f}x ({r[1]})")
    r = max(v2t, key=lambda r: r[2])
    print(f"target >= {TARGET_TOKENS_S:,.0f} tokens/s at the best batch size: {r[2]:,.0f} "
          f"({r[1]}, batch {r[0]})")


if __name__ == "__main__":
    sys.exit(main())

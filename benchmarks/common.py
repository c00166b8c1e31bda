"""What the benchmark scripts share: model sizes, a random-weight model with its checkpoint and
exports, the seed's decoding algorithm, timing and the printed table.

Timing rule for every script: one warm-up call (left out), then up to --repeats timed calls, of
which the median is reported; a row stops early, after at least MIN_RUNS calls, once its timed
calls have taken --max-seconds, so the slow baselines at large batch sizes stay affordable.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from v2t_engine.config import ModelConfig
from v2t_engine.runtime.manifest import Manifest, is_export_dir
from v2t_engine.tokenizer import SPECIAL_TOKENS, CaptionTokenizer
from v2t_export.exporter import export_checkpoint
from v2t_training.checkpoint import is_checkpoint, load_model, save_checkpoint
from v2t_training.model import VideoCaptioner

# The seed's model: CLIP ViT-L/14 frame encoder, 12-layer minGPT decoder, bert-base-chinese
# vocabulary (EASYNLP.md §1, §4).
FULL = ModelConfig(vocab_size=21128, frame_num=4, img_size=224, text_len=32, n_layer=12, n_head=12,
                   n_embd=768, vit_width=1024, vit_layers=24, vit_heads=16, vit_patch_size=14)
# The same code paths in seconds.
TINY = ModelConfig(vocab_size=500, frame_num=4, img_size=32, text_len=8, n_layer=2, n_head=4,
                   n_embd=64, vit_width=64, vit_layers=2, vit_heads=4, vit_patch_size=8)
MIN_RUNS = 3
SEED = 0


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model: checks the script in seconds")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median reported)")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help=f"stop a row's timed runs after this long (at least {MIN_RUNS} runs)")
    parser.add_argument("--threads", type=int, default=None, help="threads for PyTorch and ORT (default: all cores)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the checkpoint and exports here and reuse them on the next run "
                             "(default: a temporary directory)")
    return parser


def setup(args: argparse.Namespace) -> tuple[ModelConfig, Path]:
    """Model config and working directory for a parsed command line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="v2t-bench-"))
    return (TINY if args.tiny else FULL), workdir / ("tiny" if args.tiny else "full")


# ---------------------------------------------------------------------------------------------
# Model and artifacts


def never_end(model: VideoCaptioner) -> VideoCaptioner:
    """Make [PAD] (the end token) lose every greedy step, so random weights still write captions
    of exactly text_len tokens and every method does the same amount of work.

    One final-LayerNorm channel is pinned to a constant (weight 0, bias 3), and [PAD]'s row of
    the output head reads only that channel with weight -0.1: its logit is always -0.3, while
    the maximum over the other tokens' random logits is far above it. Both values stay within
    the ordinary range of activations and weights, so int8 quantization is not distorted by an
    outlier.
    """
    dec, pad = model.transformer, model.cfg.pad_id
    with torch.no_grad():
        dec.ln_f.weight[0] = 0.0
        dec.ln_f.bias[0] = 3.0
        dec.head.weight[pad].zero_()
        dec.head.weight[pad, 0] = -0.1
    return model


def synthetic_tokenizer(vocab_size: int, directory: Path) -> CaptionTokenizer:
    """A BERT vocabulary of the wanted size: the special tokens, then made-up words."""
    words = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS)))]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("".join(w + "\n" for w in words), encoding="utf-8")
    return CaptionTokenizer.from_dir(directory / "vocab.txt")


def checkpoint(cfg: ModelConfig, workdir: Path) -> Path:
    """A checkpoint of a random-weight model (see never_end), reused when workdir has one of this
    config."""
    ck = workdir / "checkpoint"
    if is_checkpoint(ck) and ModelConfig.load(ck) == cfg:
        return ck
    torch.manual_seed(SEED)
    model = never_end(VideoCaptioner(cfg).eval())
    save_checkpoint(ck, model, synthetic_tokenizer(cfg.vocab_size, workdir / "vocab"))
    return ck


def export(ck: Path, precision: str) -> Path:
    """`v2t export --precision` of the checkpoint (validated), reused when already made from it."""
    out = ck.parent / f"onnx-{precision}"
    if is_export_dir(out) and Manifest.load(out).config == ModelConfig.load(ck):
        return out
    print(f"exporting {precision} (validated against PyTorch) ...", flush=True)
    # Random weights give near-tied logits, so int8 rounding flips greedy tokens far more often
    # than in a trained model (whose agreement the tests check): the int8 exports here are kept
    # whatever their agreement, and the scripts report it beside their timings.
    export_checkpoint(ck, out, precision=precision, min_agreement=None if precision == "fp32" else 0.0)
    return out


def validation(export_dir: Path) -> dict[str, Any]:
    return Manifest.load(export_dir).validation


def load_eager(ck: Path) -> VideoCaptioner:
    return load_model(ck)[0].eval()


# ---------------------------------------------------------------------------------------------
# The seed's decoding algorithm


@torch.no_grad()
def recompute_greedy(model: VideoCaptioner, prefix: torch.Tensor, steps: int) -> torch.Tensor:
    """EasyNLP's predict loop (EASYNLP.md §7) with greedy choice instead of top-k sampling: every
    step runs the whole sequence [frames, tokens so far] through the decoder without a cache and
    computes logits for every position, as minGPT does, then keeps the last. prefix (B, F, E) →
    tokens (B, steps), on the prefix's device (the model must be there too)."""
    B = prefix.shape[0]
    # The tokens follow the prefix, so the same loop is the seed's baseline on CPU and on a GPU.
    tokens = torch.zeros(B, 0, dtype=torch.long, device=prefix.device)
    for _ in range(steps):
        logits, _ = model.transformer(tokens, prefix_embeds=prefix)  # (B, F+t, V)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


# ---------------------------------------------------------------------------------------------
# Timing and output


@dataclass
class Timing:
    median_s: float
    runs: int
    result: Any  # the last call's return value, for agreement checks


def measure(fn: Callable[[], Any], repeats: int, max_seconds: float,
            warmup: Callable[[], Any] | None = None) -> Timing:
    """Times fn (see the module docstring). The warm-up is fn itself unless a cheaper call that
    touches the same code is given."""
    result = (warmup or fn)()  # first-call allocation, lazy initialisation, caches
    times: list[float] = []
    while len(times) < max(repeats, 1):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if len(times) >= MIN_RUNS and sum(times) > max_seconds:
            break
    return Timing(statistics.median(times), len(times), result)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table, so a run's output can be pasted into the README as it is."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    print(f"\n{title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join(" --- " for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")
    print(flush=True)


def describe(cfg: ModelConfig) -> str:
    return json.dumps({k: v for k, v in cfg.to_dict().items() if k != "model_type"})

"""Check an export directory against the PyTorch model it came from: tensor differences on
random inputs for every graph, then greedy generation, whose tokens must equal PyTorch's (fp32)
or agree on most positions (int8, fp16, bf16), with the agreement recorded in the manifest.

Where ONNX Runtime on the validating device cannot run the precision (bf16 on the CPU), nothing
is run and the manifest says so (`pending_validation`): the export is written, and validated by
exporting again with `--device cuda`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from v2t_engine.runtime.backends.ort import OrtBackend, unsupported_precision
from v2t_engine.runtime.backends.trt import TrtBackend
from v2t_engine.inputs.preprocess import normalize
from v2t_engine.runtime.contract import NUM_FRAMES, cache_len, encoder_contract
from v2t_engine.errors import ConfigError, ExportValidationError
from v2t_engine.runtime.generator import generate_candidates
from v2t_engine.runtime.manifest import pending_validation
from v2t_engine.runtime.search import SearchOptions
from v2t_training.model import VideoCaptioner

log = logging.getLogger(__name__)

# Max abs difference allowed, relative to max(1, |reference|), per precision. fp32 graphs differ
# from PyTorch only by operation order (~1e-6); int8 graphs carry quantization error, a few
# percent of a tensor's range at most for these transformer layers. Half graphs round every
# activation to 11 (fp16) or 8 (bf16) significant bits between fp32 LayerNorms.
TOLERANCE = {"fp32": 1e-3, "int8": 1e-1, "int8_encoder": 1e-1, "fp16": 2e-2, "bf16": 1e-1}
# Least fraction of greedy tokens equal to PyTorch's: fp32 must give the same captions; lower
# precisions may flip near-tied tokens (and with them the rest of a caption), so their agreement
# is reported and must stay high.
MIN_GREEDY_AGREEMENT = {"fp32": 1.0, "int8": 0.9, "int8_encoder": 0.9, "fp16": 0.9, "bf16": 0.9}


def check_min_agreement(precision: str, min_agreement: float | None) -> float:
    """The greedy agreement an export of `precision` must reach: the default, or a user's override."""
    if min_agreement is None:
        return MIN_GREEDY_AGREEMENT[precision]
    if not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"min_agreement must lie in [0, 1], got {min_agreement}")
    if precision == "fp32" and min_agreement < 1.0:
        raise ConfigError("min_agreement cannot be lowered for fp32: an fp32 graph must give "
                          "PyTorch's greedy tokens exactly")
    return min_agreement


def _max_diff(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    return diff, diff / scale


def _ort_prefill(backend: OrtBackend, prefix: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    cfg = backend.config
    B, Fr, _ = prefix.shape
    logits = np.empty((B, cfg.vocab_size), np.float32)
    kv = [np.empty((B, cfg.n_head, Fr, cfg.head_dim), np.float32) for _ in range(2 * cfg.n_layer)]
    backend.prefill(np.ascontiguousarray(prefix, np.float32), logits, kv)
    return logits, kv


def _ort_decode(backend: OrtBackend, tokens: np.ndarray, position: int, cache: list[np.ndarray]
                ) -> tuple[np.ndarray, list[np.ndarray]]:
    cfg = backend.config
    B = tokens.shape[0]
    logits = np.empty((B, cfg.vocab_size), np.float32)
    new = [np.empty((B, cfg.n_head, 1, cfg.head_dim), np.float32) for _ in cache]
    backend.decode(tokens[:, None].astype(np.int64), np.full((B, 1), position, np.int64), cache, logits, new)
    return logits, new


def _flat(kv) -> list[np.ndarray]:
    return [t.numpy() for pair in kv for t in pair]


def _compare_decoder(model: VideoCaptioner, backend: OrtBackend, prefix: np.ndarray,
                     rng: np.random.Generator, n_steps: int) -> dict[str, tuple[float, float]]:
    """The prefill, then decode steps over the fixed-length cache the prefill filled, the same
    tokens through both; PyTorch's side is the model's own forward with its growing cache, so
    the decode graph is checked against the math training uses. The cache's unwritten columns
    hold noise: a row must not see past its position."""
    cfg = model.cfg
    B, Fr = prefix.shape[:2]
    t_logits, t_past = model.transformer(torch.zeros(B, 0, dtype=torch.long), torch.from_numpy(prefix),
                                         last_only=True)
    o_logits, o_kv = _ort_prefill(backend, prefix)
    step_diffs = [_max_diff(o_logits, t_logits.numpy())]
    cache_diffs = [_max_diff(o, t) for o, t in zip(o_kv, _flat(t_past))]
    cache = [rng.standard_normal((B, cfg.n_head, cache_len(cfg), cfg.head_dim)).astype(np.float32) for _ in o_kv]
    for dst, src in zip(cache, o_kv):
        dst[:, :, :Fr] = src
    for step in range(min(n_steps, cfg.text_len - 1)):
        tokens = rng.integers(0, cfg.vocab_size, B)
        t_logits, t_past = model.transformer(torch.from_numpy(tokens[:, None]), past=t_past, last_only=True)
        o_logits, new = _ort_decode(backend, tokens, Fr + step, cache)
        step_diffs.append(_max_diff(o_logits, t_logits.numpy()))
        cache_diffs += [_max_diff(o, t[:, :, -1:]) for o, t in zip(new, _flat(t_past))]
        for dst, src in zip(cache, new):
            dst[:, :, Fr + step] = src[:, :, 0]
    return {"decoder_logits": max(step_diffs, key=lambda d: d[1]),
            "decoder_kv_cache": max(cache_diffs, key=lambda d: d[1])}


def _compare_greedy(model: VideoCaptioner, backend, pixels: np.ndarray) -> dict[str, Any]:
    """Greedy captions end to end through the runtime's own generator vs PyTorch's reference."""
    t_tokens = model.generate_greedy(torch.from_numpy(normalize(pixels))).numpy()
    o_tokens = generate_candidates(backend, pixels, SearchOptions(), np.random.default_rng(0),
                                   model.cfg.text_len)[:, 0, :]
    return {"greedy_tokens_equal": bool(np.array_equal(t_tokens, o_tokens)),
            "greedy_token_agreement": float((t_tokens == o_tokens).mean()),
            "greedy_caption_agreement": float((t_tokens == o_tokens).all(axis=1).mean()),
            "greedy_videos": len(t_tokens)}


@torch.no_grad()
def validate_export(model: VideoCaptioner, export_dir: str | Path, precision: str = "fp32",
                    seed: int = 0, n_videos: int = 4, n_steps: int = 3,
                    min_agreement: float | None = None, device: str = "cpu") -> dict[str, Any]:
    """Compares the export, run by ONNX Runtime on `device`, with the fp32 PyTorch model it came
    from, on random inputs. Returns the figures for the manifest; raises ExportValidationError
    past the precision's tolerances. Where ONNX Runtime on `device` cannot run `precision`, runs
    nothing and returns the pending record saying so.

    min_agreement overrides MIN_GREEDY_AGREEMENT for lower precisions; fp32 must always give
    PyTorch's tokens, since any difference there is a bug, not rounding."""
    tol = TOLERANCE[precision]
    min_agreement = check_min_agreement(precision, min_agreement)
    if reason := unsupported_precision(precision, device):
        log.warning("export in %s is NOT validated: %s", export_dir, reason)
        return pending_validation(precision, f"{reason}; validate it by exporting on a GPU machine "
                                             f"with `v2t export --precision {precision} --device cuda`")
    model = model.eval().float()
    cfg = model.cfg
    backend = OrtBackend(export_dir, device=device)
    report: dict[str, Any] = {"precision": precision, "validated": True, "device": device,
                              "relative_tolerance": tol, "min_greedy_agreement": min_agreement}

    (frames,) = encoder_contract(cfg).example({NUM_FRAMES: n_videos * cfg.frame_num}, seed).values()  # uint8
    ref = model.first_stage_model(torch.from_numpy(normalize(frames)))
    worst = {"frame_encoder": _max_diff(backend.encode_frames(frames), ref.numpy())}
    # The decoder is compared on the PyTorch encoder's output, so its figures are its own error.
    worst.update(_compare_decoder(model, backend, ref.view(n_videos, cfg.frame_num, -1).numpy(),
                                  np.random.default_rng(seed), n_steps))
    for name, (abs_diff, rel_diff) in worst.items():
        report[f"{name}_max_abs_diff"] = abs_diff
        log.info("validation: %s max abs diff %.3g (relative %.3g, tolerance %.1g)", name, abs_diff, rel_diff, tol)
    report.update(_compare_greedy(model, backend, frames.reshape(n_videos, cfg.frame_num, *frames.shape[1:])))

    problems = [f"{n}: max abs diff {worst[n][0]:.3g} exceeds relative tolerance {tol:g}"
                for n, (_, rel) in worst.items() if not rel <= tol]  # `not <=` also catches NaN
    if not report["greedy_token_agreement"] >= min_agreement:
        problems.append(f"greedy tokens agree with PyTorch's on {report['greedy_token_agreement']:.1%} "
                        f"of positions, below the {min_agreement:.0%} required for {precision}")
    if problems:
        raise ExportValidationError(f"export in {export_dir} failed validation: " + "; ".join(problems))
    return report


@torch.no_grad()
def validate_engines(model: VideoCaptioner, export_dir: str | Path, precision: str, seed: int = 0,
                     n_videos: int = 4, min_agreement: float | None = None) -> dict[str, Any]:
    """Greedy captions of the TensorRT engines in `export_dir` (the trt backend, on this GPU)
    against the fp32 PyTorch model, on the random frames `validate_export` uses: the record for
    the manifest's validation, or ExportValidationError below the precision's agreement. Runs
    where engines were just built, so TensorRT, CuPy and the GPU are there."""
    min_agreement = check_min_agreement(precision, min_agreement)
    model = model.eval().float()
    cfg = model.cfg
    backend = TrtBackend(export_dir, device="cuda")
    (frames,) = encoder_contract(cfg).example({NUM_FRAMES: n_videos * cfg.frame_num}, seed).values()  # uint8
    report: dict[str, Any] = {"precision": precision, "validated": True, "gpu": backend.block.gpu_name,
                              "min_greedy_agreement": min_agreement,
                              **_compare_greedy(model, backend, frames.reshape(n_videos, cfg.frame_num,
                                                                               *frames.shape[1:]))}
    log.info("validation: TensorRT engines' greedy tokens agree with PyTorch's on %.1f%% of positions",
             100 * report["greedy_token_agreement"])
    if not report["greedy_token_agreement"] >= min_agreement:
        raise ExportValidationError(f"TensorRT engines in {export_dir} failed validation: greedy tokens agree "
                                    f"with PyTorch's on {report['greedy_token_agreement']:.1%} of positions, below "
                                    f"the {min_agreement:.0%} required for {precision}")
    return report

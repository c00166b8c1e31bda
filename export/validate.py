"""Check an export directory against the PyTorch model it came from: tensor differences on
random inputs for both graphs, then greedy generation, whose tokens must equal PyTorch's (fp32)
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
from v2t_engine.runtime.contract import NUM_FRAMES, DecoderInputs, encoder_contract
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


def _ort_step(backend: OrtBackend, inputs: DecoderInputs, past: list[np.ndarray]
              ) -> tuple[np.ndarray, list[np.ndarray]]:
    """One decoder step into freshly allocated present arrays (the generator reuses buffers;
    validation keeps every step's cache to compare it)."""
    cfg = backend.config
    B, total = inputs.attention_mask.shape
    present = [np.empty((B, cfg.n_head, total, cfg.head_dim), np.float32) for _ in past]
    return backend.decoder_step(inputs, past, present), present


def _torch_step(model: VideoCaptioner, inputs: DecoderInputs, past) -> tuple[torch.Tensor, list]:
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.feeds().values()]
    return model.transformer(*tensors, past, last_only=True)


def _cache_diffs(ort_past: list[np.ndarray], torch_past) -> list[tuple[float, float]]:
    return [_max_diff(o, t.numpy()) for o, t in zip(ort_past, [x for kv in torch_past for x in kv])]


def _compare_decoder(model: VideoCaptioner, backend: OrtBackend, prefix: np.ndarray,
                     rng: np.random.Generator, n_steps: int) -> dict[str, tuple[float, float]]:
    """The prefix step from an empty past, then token steps on the returned cache, the same
    inputs through both."""
    cfg = model.cfg
    B, Fr = prefix.shape[:2]
    inputs = DecoderInputs.prefix_step(prefix)
    t_logits, t_past = _torch_step(model, inputs, None)
    empty = np.zeros((B, cfg.n_head, 0, cfg.head_dim), np.float32)
    o_logits, o_past = _ort_step(backend, inputs, [empty] * (2 * cfg.n_layer))
    step_diffs = [_max_diff(o_logits, t_logits.numpy())]
    cache_diffs = _cache_diffs(o_past, t_past)
    for step in range(min(n_steps, cfg.text_len - 1)):
        inputs = DecoderInputs.token_step(rng.integers(0, cfg.vocab_size, (B, 1)),
                                          np.full((B, 1), Fr + step, np.int64),
                                          np.ones((B, Fr + step + 1), np.int64), cfg.n_embd)
        t_logits, t_past = _torch_step(model, inputs, t_past)
        o_logits, o_past = _ort_step(backend, inputs, o_past)
        step_diffs.append(_max_diff(o_logits, t_logits.numpy()))
        cache_diffs += _cache_diffs(o_past, t_past)
    return {"decoder_logits": max(step_diffs, key=lambda d: d[1]),
            "decoder_kv_cache": max(cache_diffs, key=lambda d: d[1])}


def _compare_greedy(model: VideoCaptioner, backend: OrtBackend, pixels: torch.Tensor) -> dict[str, Any]:
    """Greedy captions end to end through the runtime's own generator vs PyTorch's reference."""
    t_tokens = model.generate_greedy(pixels).numpy()
    o_tokens = generate_candidates(backend, pixels.numpy(), SearchOptions(), np.random.default_rng(0),
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

    (example,) = encoder_contract(cfg).example({NUM_FRAMES: n_videos * cfg.frame_num}, seed).values()
    frames = torch.from_numpy(example)  # (N, 3, S, S), standard normal as CLIP-normalized pixels are
    ref = model.first_stage_model(frames)
    worst = {"frame_encoder": _max_diff(backend.encode_frames(frames.numpy()), ref.numpy())}
    # The decoder is compared on the PyTorch encoder's output, so its figures are its own error.
    worst.update(_compare_decoder(model, backend, ref.view(n_videos, cfg.frame_num, -1).numpy(),
                                  np.random.default_rng(seed), n_steps))
    for name, (abs_diff, rel_diff) in worst.items():
        report[f"{name}_max_abs_diff"] = abs_diff
        log.info("validation: %s max abs diff %.3g (relative %.3g, tolerance %.1g)", name, abs_diff, rel_diff, tol)
    report.update(_compare_greedy(model, backend, frames.view(n_videos, cfg.frame_num, *frames.shape[1:])))

    problems = [f"{n}: max abs diff {worst[n][0]:.3g} exceeds relative tolerance {tol:g}"
                for n, (_, rel) in worst.items() if not rel <= tol]  # `not <=` also catches NaN
    if not report["greedy_token_agreement"] >= min_agreement:
        problems.append(f"greedy tokens agree with PyTorch's on {report['greedy_token_agreement']:.1%} "
                        f"of positions, below the {min_agreement:.0%} required for {precision}")
    if problems:
        raise ExportValidationError(f"export in {export_dir} failed validation: " + "; ".join(problems))
    return report

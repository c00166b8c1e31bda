"""Check an export directory against the PyTorch model it came from: tensor differences on
random inputs for both graphs, then greedy generation that must give the same tokens."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from v2t_engine.backends.ort import OrtBackend
from v2t_engine.errors import ExportValidationError
from v2t_engine.generator import generate_candidates
from v2t_engine.search import SearchOptions
from v2t_training.model import VideoCaptioner

log = logging.getLogger(__name__)

# Max abs difference allowed, relative to max(1, |reference|), per precision.
TOLERANCE = {"fp32": 1e-3}


def _max_diff(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    return diff, diff / scale


@torch.no_grad()
def validate_export(model: VideoCaptioner, export_dir: str | Path, precision: str = "fp32",
                    seed: int = 0, n_videos: int = 4, n_steps: int = 3) -> dict[str, Any]:
    """Returns the figures for the manifest; raises ExportValidationError past tolerance."""
    tol = TOLERANCE[precision]
    model = model.eval().float()
    cfg = model.cfg
    backend = OrtBackend(export_dir)
    gen = torch.Generator().manual_seed(seed)
    report: dict[str, Any] = {"precision": precision, "relative_tolerance": tol}
    worst = {}

    frames = torch.randn(n_videos * cfg.frame_num, 3, cfg.img_size, cfg.img_size, generator=gen)
    ref = model.first_stage_model(frames).numpy()
    worst["frame_encoder"] = _max_diff(backend.encode(frames.numpy()), ref)

    # Decoder: the prefix step from an empty past, then token steps on the returned cache.
    B, Fr = n_videos, cfg.frame_num
    prefix = torch.from_numpy(ref.reshape(B, Fr, -1))
    ids = torch.zeros(B, 0, dtype=torch.long)
    positions = torch.arange(Fr).expand(B, Fr)
    t_logits, t_past = model.transformer(ids, prefix, positions, torch.ones(B, Fr, dtype=torch.long),
                                         None, last_only=True)
    o_logits, o_past = backend.decode(ids.numpy(), prefix.numpy(), positions.numpy().copy(),
                                      np.ones((B, Fr), np.int64), backend.empty_cache(B))
    step_diffs = [_max_diff(o_logits, t_logits.numpy())]
    cache_diffs = [_max_diff(o, t.numpy()) for o, t in zip(o_past, [x for kv in t_past for x in kv])]
    no_prefix = torch.zeros(B, 0, cfg.n_embd)
    for step in range(min(n_steps, cfg.text_len - 1)):
        tok = torch.randint(0, cfg.vocab_size, (B, 1), generator=gen)
        pos = torch.full((B, 1), Fr + step, dtype=torch.long)
        mask = torch.ones(B, Fr + step + 1, dtype=torch.long)
        t_logits, t_past = model.transformer(tok, no_prefix, pos, mask, t_past, last_only=True)
        o_logits, o_past = backend.decode(tok.numpy(), no_prefix.numpy(), pos.numpy(), mask.numpy(), o_past)
        step_diffs.append(_max_diff(o_logits, t_logits.numpy()))
        cache_diffs += [_max_diff(o, t.numpy()) for o, t in zip(o_past, [x for kv in t_past for x in kv])]
    worst["decoder_logits"] = max(step_diffs, key=lambda d: d[1])
    worst["decoder_kv_cache"] = max(cache_diffs, key=lambda d: d[1])

    for name, (abs_diff, rel_diff) in worst.items():
        report[f"{name}_max_abs_diff"] = abs_diff
        log.info("validation: %s max abs diff %.3g (relative %.3g, tolerance %.1g)", name, abs_diff, rel_diff, tol)
    failed = [n for n, (_, rel) in worst.items() if not rel <= tol]  # `not <=` also catches NaN

    # Greedy generation: the same tokens, end to end through the runtime's own generator.
    pixels = frames.view(B, Fr, 3, cfg.img_size, cfg.img_size)
    t_tokens = model.generate_greedy(pixels).numpy()
    o_tokens = generate_candidates(backend, pixels.numpy(), SearchOptions(), np.random.default_rng(0),
                                   cfg.text_len)[:, 0, :]
    report["greedy_tokens_equal"] = bool(np.array_equal(t_tokens, o_tokens))
    report["greedy_videos"] = B
    if failed or not report["greedy_tokens_equal"]:
        problems = [f"{n}: max abs diff {worst[n][0]:.3g} exceeds relative tolerance {tol:g}" for n in failed]
        if not report["greedy_tokens_equal"]:
            problems.append("greedy tokens differ from PyTorch: "
                            f"{o_tokens.tolist()} != {t_tokens.tolist()}")
        raise ExportValidationError(f"export in {export_dir} failed validation: " + "; ".join(problems))
    return report

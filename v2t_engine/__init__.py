"""v2t's runtime: caption videos with an exported model, without torch.

    from v2t_engine import Captioner, SearchOptions
    captioner = Captioner.load("export_dir")                 # ONNX Runtime
    captions = captioner.caption_pixels(pixels)              # (B, F, 3, S, S) float32, CLIP-normalized
    captions = captioner.caption_pixels(pixels, SearchOptions(do_sample=True, top_k=100, seed=0))

Layout: ``inputs/`` (tables, frames, CLIP preprocessing, output writer: shared with training),
``runtime/`` (graph contract, manifest, backends, KV cache, search, generator, Captioner),
``jobs/`` (what a command runs: predict, make-table, eval, synth), ``video/`` (the optional video
input), ``cli/`` (the `v2t` command). Names are loaded on first use, so importing one submodule
(training imports ``v2t_engine.config``) does not load the runtime.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name → the module that defines it
_EXPORTS = {
    "Captioner": "v2t_engine.runtime.captioner",
    "CaptionGenerator": "v2t_engine.runtime.generator",
    "SearchOptions": "v2t_engine.runtime.search",
    "ModelConfig": "v2t_engine.config",
    "CaptionTokenizer": "v2t_engine.tokenizer",
    "PredictOptions": "v2t_engine.jobs.predict",
    "predict_tables": "v2t_engine.jobs.predict",
    "predict_videos": "v2t_engine.jobs.predict",
    "FrameSource": "v2t_engine.inputs.frames",
    "load_row_frames": "v2t_engine.inputs.frames",
    "preprocess_images": "v2t_engine.inputs.preprocess",
    "CaptionService": "v2t_engine.serve.service",
    **{name: "v2t_engine.errors" for name in (
        "V2TError", "ConfigError", "TableError", "RowError", "FrameError", "ArtifactError",
        "ExportValidationError", "MissingDependencyError", "ServiceOverloaded", "ServiceClosed")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'v2t_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""`v2t export`: checkpoint directory → export directory (graphs, tokenizer, manifest), validated;
with `--format trt`, TensorRT engines built from the validated graphs beside them."""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from v2t_engine.errors import ConfigError
from v2t_engine.runtime.backends.ort import providers_for
from v2t_engine.runtime.manifest import TOKENIZER_FILE, Manifest
from v2t_engine.runtime.tensorrt import DEFAULT_MAX_BATCH, TIMING_CACHE_FILE
from v2t_training.checkpoint import load_model
from v2t_training.model import VideoCaptioner

from v2t_export.onnx_export import OPSET, export_onnx
from v2t_export.quantize import check_precision, quantize_graphs
from v2t_export.trt import build_engines, check_can_build, check_trt_precision
from v2t_export.validate import check_min_agreement, validate_engines, validate_export

log = logging.getLogger(__name__)

FORMATS = ("onnx", "trt")


def export_checkpoint(checkpoint_dir: str | Path, output: str | Path, fmt: str = "onnx",
                      precision: str = "fp32", min_agreement: float | None = None,
                      device: str = "cpu", max_batch: int = DEFAULT_MAX_BATCH) -> Manifest:
    """`device`: where validation runs the graphs with ONNX Runtime. Where that cannot run
    `precision` (bf16 on the CPU), the export is written with its validation recorded as pending.
    With `fmt` "trt", engines for batches of up to `max_batch` decoder rows are built from the
    graphs and validated on this machine's GPU; what the machine lacks for that is said first."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_precision(precision)
    if fmt == "trt":
        check_trt_precision(precision)
        if max_batch < 1:
            raise ConfigError(f"--max_batch must be at least 1, got {max_batch}")
        check_can_build()  # no TensorRT, CuPy or GPU: one line now, not after minutes of export
    check_min_agreement(precision, min_agreement)  # before minutes of export, not after
    providers_for(device)  # --device cuda without onnxruntime-gpu: said now, not after the export
    checkpoint_dir, output = Path(checkpoint_dir), Path(output)
    if output.resolve() == checkpoint_dir.resolve():
        raise ConfigError("--output must differ from --checkpoint_dir")
    model, tokenizer = load_model(checkpoint_dir)

    # Build in a sibling temp directory and swap it in at the end: a failed or interrupted
    # export never leaves a half-written directory that looks usable.
    tmp = output.with_name(output.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    quantize_graphs(export_onnx(model, tmp), precision)
    tokenizer.save(tmp)
    manifest = Manifest(config=model.cfg, opset=OPSET, precision=precision,
                        tokenizer_file=TOKENIZER_FILE, source=str(checkpoint_dir)).with_file_digests(tmp)
    manifest.save(tmp)  # validation loads the directory as the runtime will
    report = validate_export(model, tmp, precision, min_agreement=min_agreement, device=device)
    manifest = dataclasses.replace(manifest, validation=report)
    if fmt == "trt":
        manifest = _add_engines(model, manifest, tmp, output / TIMING_CACHE_FILE, max_batch, min_agreement)
    manifest.save(tmp)
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return manifest


def _add_engines(model: VideoCaptioner, manifest: Manifest, tmp: Path, previous_cache: Path, max_batch: int,
                 min_agreement: float | None) -> Manifest:
    """Build the engines from the validated graphs in `tmp` (starting from the timing cache of the
    engines being replaced, where there are some), list them and their block in the manifest,
    and validate them on the GPU: their greedy agreement goes into the validation record."""
    block = build_engines(tmp, manifest.precision, max_batch=max_batch,
                          reuse_timing_cache=previous_cache if previous_cache.is_file() else None)
    manifest = dataclasses.replace(manifest, tensorrt=block).with_file_digests(tmp)
    manifest.save(tmp)  # the trt backend loads the directory as the runtime will
    engines = validate_engines(model, tmp, manifest.precision, n_videos=min(4, max_batch),
                               min_agreement=min_agreement)
    return dataclasses.replace(manifest, validation={**manifest.validation, "tensorrt": engines})

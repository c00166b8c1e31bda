"""`v2t export`: checkpoint directory → export directory (graphs, tokenizer, manifest), validated."""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from v2t_engine.errors import ConfigError
from v2t_engine.runtime.backends.ort import providers_for
from v2t_engine.runtime.manifest import TOKENIZER_FILE, Manifest
from v2t_training.checkpoint import load_model

from v2t_export.onnx_export import OPSET, export_onnx
from v2t_export.quantize import check_precision, quantize_graphs
from v2t_export.validate import check_min_agreement, validate_export

log = logging.getLogger(__name__)

FORMATS = ("onnx", "trt")


def export_checkpoint(checkpoint_dir: str | Path, output: str | Path, fmt: str = "onnx",
                      precision: str = "fp32", min_agreement: float | None = None,
                      device: str = "cpu") -> Manifest:
    """`device`: where validation runs the graphs with ONNX Runtime. Where that cannot run
    `precision` (bf16 on the CPU), the export is written with its validation recorded as pending."""
    if fmt == "trt":
        _require_tensorrt()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_precision(precision)
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
    manifest.save(tmp)
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return manifest


def _require_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise ConfigError("--format trt needs TensorRT and a CUDA GPU, and this machine has no "
                          "`tensorrt` module (pip install 'v2t[gpu]' on a GPU machine). "
                          "Use --format onnx here.") from None
    raise ConfigError("--format trt: TensorRT engine building is not implemented in this "
                      "version yet; export --format onnx and run it with ONNX Runtime.")

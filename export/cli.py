"""`v2t export`: registered as an entry point of `v2t.commands`, loaded only when invoked (it needs torch)."""
from __future__ import annotations

import json

import click

from v2t_engine.cli.options import checkpoint_dir_option, easynlp_option
from v2t_engine.runtime.tensorrt import DEFAULT_MAX_BATCH

from v2t_export.exporter import FORMATS, export_checkpoint
from v2t_export.quantize import PRECISIONS


@click.command("export")
@checkpoint_dir_option
@easynlp_option("output", required=True, type=click.Path(file_okay=False),
                help="Export directory to create (replaced if it exists).")
@easynlp_option("format", "fmt", type=click.Choice(FORMATS), default="onnx", show_default=True)
@easynlp_option("precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                help="fp32; int8_encoder (frame encoder in int8, ONNX Runtime dynamic quantization: "
                     "several times faster on CPUs with int8 dot products) or int8 (both graphs); "
                     "fp16 or bf16 for GPUs (LayerNorm, softmax and the logits stay fp32). Greedy "
                     "agreement is checked and recorded; ONNX Runtime's CPU provider has no bf16 "
                     "kernels, so a bf16 export made with --device cpu records its validation as "
                     "pending.")
@easynlp_option("min_agreement", type=click.FloatRange(0.0, 1.0), default=None,
                help="Least share of greedy tokens the int8, fp16 or bf16 graphs must give as "
                     "PyTorch does in validation (default 0.9). Validation decodes random frames, "
                     "where a model's near-tied tokens flip under quantization or rounding more "
                     "often than on real videos.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where validation runs the exported graphs with ONNX Runtime (cuda needs "
                   "onnxruntime-gpu). TensorRT engines are validated on the GPU they are built on.")
@easynlp_option("max_batch", type=click.IntRange(min=1), default=DEFAULT_MAX_BATCH, show_default=True,
                help="--format trt: the most decoder rows the engines run at once, which a job's slots "
                     "must not exceed: predict's --micro_batch_size (times --num_beams, or the captions "
                     "sampled per video).")
def export_command(checkpoint_dir, output, fmt, precision, min_agreement, device, max_batch):
    """Export a training checkpoint to a frame-encoder graph and an incremental decoder graph with
    a KV cache, validated against PyTorch (tensor differences and greedy tokens). With --format trt,
    also TensorRT engines built from those graphs for this machine's GPU and TensorRT, validated there.

    \b
    Example:
      v2t export --checkpoint_dir ck --format onnx --output ck_onnx
      v2t export --checkpoint_dir ck --output ck_int8 --precision int8_encoder
      v2t export --checkpoint_dir ck --output ck_bf16 --precision bf16 --device cuda
      v2t export --checkpoint_dir ck --output ck_trt --format trt --precision fp16 --max_batch 256
    """
    manifest = export_checkpoint(checkpoint_dir, output, fmt, precision, min_agreement, device, max_batch)
    click.echo(f"exported to {output}; validation: {json.dumps(manifest.validation)}")

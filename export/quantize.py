"""Lower-precision copies of the exported fp32 graphs, made in place after the fp32 export.

int8 (every graph) and int8_encoder (the frame encoder only, prefill and decode stay fp32): ONNX
Runtime dynamic quantization. Weights of MatMul/Gemm become int8 (per output channel:
one scale per column keeps the columns with small weights from losing all their bits to the
largest column), activations are quantized to uint8 per tensor at run time. ORT fuses the result
into DynamicQuantizeMatMul, which runs on the CPU's int8 dot-product units (VNNI), several times
the fp32 GEMM rate. Convolutions stay fp32: the only one is the ViT's patch embedding, a few
percent of the encoder's work. The frame encoder is most of the compute, and its int8 error moves
few captions; the decoder's int8 error goes straight into the logits that greedy search compares,
so it flips more near-tied tokens: int8_encoder is the choice that keeps captions, int8 the
fastest (README, "Benchmarks").

Weights are quantized to 7 bits (``reduce_range``). On CPUs without VNNI, ORT's AVX2/AVX-512
int8 kernels multiply uint8 activations by int8 weights in 16-bit lanes that saturate with 8-bit
weights, enough to fail validation (README gives the measurement). An export may be built on one
CPU and run on another, so every int8 export takes the range that is exact on both.

fp16 and bf16 (every graph): half.py's rewrite, LayerNorm, Softmax, the head and the graph I/O
kept in fp32. ONNX Runtime's CPU provider has no bfloat16 arithmetic kernels (MatMul, Gemm, Add,
Softmax are all missing in 1.32; microsoft/onnxruntime#20630), so a bf16 export is for GPUs
(TensorRT, ONNX Runtime's CUDA provider); made on a CPU, its validation is recorded as pending.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from v2t_engine.errors import ConfigError

from v2t_export.half import HALF_TYPES, to_half_graph

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "int8_encoder", "fp16", "bf16")
# Which graphs each precision quantizes to int8.
INT8_GRAPHS = {"fp32": (), "int8": ("frame_encoder", "prefill", "decode"), "int8_encoder": ("frame_encoder",),
               "fp16": (), "bf16": ()}


def check_precision(precision: str) -> None:
    """Raise ConfigError for a precision this export cannot produce, before any work is done."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def quantize_graphs(graphs: dict[str, Path], precision: str) -> None:
    """Rewrite the fp32 graph files (by graph name) that `precision` quantizes, in place."""
    check_precision(precision)
    for name, path in graphs.items():
        if precision in HALF_TYPES:
            to_half_graph(path, precision)
        elif name in INT8_GRAPHS[precision]:
            quantize_int8(path)


def quantize_int8(path: Path) -> None:
    """Dynamic int8 quantization of one graph file, replacing it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(path.name + ".int8")
    log.info("quantizing %s to int8", path.name)
    # The quantizer advises, on every call, a shape-inference pre-pass; the exported graphs carry
    # their shapes already, so the advice is dropped and other warnings still show.
    with _without_log_records(logging.getLogger(), "pre-processing before quantization"):
        quantize_dynamic(path, tmp, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                         weight_type=QuantType.QInt8, reduce_range=True,  # 7-bit weights: see above
                         # Only weights are quantized ahead of time; a MatMul of two activations
                         # (attention scores) keeps fp32.
                         extra_options={"MatMulConstBOnly": True})
    os.replace(tmp, path)
    _drop_external_data(path)


def _drop_external_data(path: Path) -> None:
    """The fp32 graph may have kept its weights in a side file; the int8 graph is small enough
    to hold them inline, so a stale side file would only waste disk."""
    path.with_name(path.name + ".data").unlink(missing_ok=True)


@contextlib.contextmanager
def _without_log_records(logger: logging.Logger, text: str) -> Iterator[None]:
    """Drop `logger`'s records whose message contains `text` while the block runs."""
    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)

"""Split a VideoCaptioner into two ONNX graphs following v2t_engine.contract:
a frame encoder and one incremental decoder with the KV cache as inputs and outputs."""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch
from torch import nn

from v2t_engine.runtime.contract import (DECODER_FILE, ENCODER_FILE, GraphContract, decoder_contract,
                                 encoder_contract)
from v2t_training.model import VideoCaptioner

log = logging.getLogger(__name__)

# The dynamo exporter at opset 17 writes a Split with an attribute opset 17 lacks (the graph
# then fails onnx.checker); 18 is the lowest opset it gets right.
OPSET = 18
# Protobuf cannot hold a single file over 2 GiB: larger graphs keep weights in a side file.
_EXTERNAL_DATA_BYTES = 1_800_000_000


class EncoderGraph(nn.Module):
    def __init__(self, model: VideoCaptioner):
        super().__init__()
        self.vit = model.first_stage_model

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.vit(frames)  # (N, 3, S, S) → (N, E)


class DecoderGraph(nn.Module):
    """Flattens the cache into positional tensors in contract order (layer-major, key first)."""

    def __init__(self, model: VideoCaptioner):
        super().__init__()
        self.decoder = model.transformer
        self.n_layer = model.cfg.n_layer

    def forward(self, input_ids, prefix_embeds, position_ids, attention_mask, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.n_layer)]
        logits, present = self.decoder(input_ids, prefix_embeds, position_ids, attention_mask,
                                       past, last_only=True)
        return (logits, *[t for kv in present for t in kv])


def _decoder_example(model: VideoCaptioner) -> tuple[torch.Tensor, ...]:
    """Example inputs with distinct sizes of at least 2 on every dynamic axis: torch.export
    specializes axes whose example size is 0 or 1, and could tie axes of equal size."""
    cfg = model.cfg
    B, P, T, past = 2, 3, 4, 5
    step = P + T
    return (
        torch.randint(0, cfg.vocab_size, (B, T)),
        torch.randn(B, P, cfg.n_embd),
        (torch.arange(past, past + step) % cfg.block_size).expand(B, step).contiguous(),
        torch.ones(B, past + step, dtype=torch.long),
        *[torch.randn(B, cfg.n_head, past, cfg.head_dim) for _ in range(2 * cfg.n_layer)],
    )


def _auto_dynamic_shapes(contract: GraphContract, n_fixed_args: int):
    """torch.export dynamic_shapes for the contract's symbolic axes. Dim.AUTO lets the exporter
    find the relations (total_len = past_len + step_len); contract names are put back after."""
    auto = torch.export.Dim.AUTO
    specs = [{axis: auto for axis in t.dynamic_axes()} for t in contract.inputs]
    return (*specs[:n_fixed_args], tuple(specs[n_fixed_args:])) if len(specs) > n_fixed_args else tuple(specs)


def _name_axes(proto: onnx.ModelProto, contract: GraphContract) -> None:
    """Replace the exporter's symbols (s10, 's15 + s69') on graph inputs and outputs by the
    contract's axis names, and check fixed sizes against the contract."""
    by_name = {t.name: t for t in (*contract.inputs, *contract.outputs)}
    for value in (*proto.graph.input, *proto.graph.output):
        spec = by_name.get(value.name)
        if spec is None:
            raise RuntimeError(f"exported graph has unexpected tensor {value.name!r}")
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(spec.shape):
            raise RuntimeError(f"{value.name}: rank {len(dims)} != contract rank {len(spec.shape)}")
        for dim, want in zip(dims, spec.shape):
            if isinstance(want, str):
                dim.ClearField("dim_value")
                dim.dim_param = want
            elif dim.HasField("dim_value") and dim.dim_value != want:
                raise RuntimeError(f"{value.name}: size {dim.dim_value} != contract size {want}")


def _export(module: nn.Module, args: tuple, contract: GraphContract, dynamic_shapes, path: Path) -> Path:
    program = torch.onnx.export(
        module, args, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes,
        input_names=contract.input_names, output_names=contract.output_names, verbose=False)
    proto = program.model_proto
    _name_axes(proto, contract)
    external = proto.ByteSize() > _EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(path), save_as_external_data=external,
                    location=path.name + ".data" if external else None)
    onnx.checker.check_model(str(path))
    return path


@torch.no_grad()
def export_onnx(model: VideoCaptioner, out_dir: str | Path) -> tuple[Path, Path]:
    """Write the frame encoder and the decoder graph into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    cfg = model.cfg

    enc_contract = encoder_contract(cfg)
    frames = torch.randn(3, 3, cfg.img_size, cfg.img_size)
    log.info("exporting the frame encoder")
    encoder_path = _export(EncoderGraph(model).eval(), (frames,), enc_contract,
                           _auto_dynamic_shapes(enc_contract, 1), out_dir / ENCODER_FILE)

    dec_contract = decoder_contract(cfg)
    log.info("exporting the decoder")
    decoder_path = _export(DecoderGraph(model).eval(), _decoder_example(model), dec_contract,
                           _auto_dynamic_shapes(dec_contract, 4), out_dir / DECODER_FILE)
    return encoder_path, decoder_path

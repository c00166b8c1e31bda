"""Split a VideoCaptioner into two ONNX graphs following v2t_engine.contract:
a frame encoder and one incremental decoder with the KV cache as inputs and outputs."""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from torch import nn

from v2t_engine.errors import ExportValidationError
from v2t_engine.runtime.contract import (DECODER_FILE, ENCODER_FILE, NUM_FRAMES, GraphContract, decoder_contract,
                                         decoder_sizes, encoder_contract)
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
        # The four leading inputs and the cache, in decoder_contract's order.
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.n_layer)]
        logits, present = self.decoder(input_ids, prefix_embeds, position_ids, attention_mask,
                                       past, last_only=True)
        return (logits, *[t for kv in present for t in kv])


def _example(contract: GraphContract, sizes: dict[str, int], vocab_size: int) -> tuple:
    """The contract's example inputs, in contract order, as the traced module's arguments."""
    return tuple(torch.from_numpy(a.copy()) for a in contract.example(sizes, vocab_size=vocab_size).values())


def _auto_dynamic_shapes(contract: GraphContract):
    """torch.export dynamic_shapes for the contract's symbolic axes: one entry per leading input,
    and one tuple for the KV cache, which the module takes as ``*past``. Dim.AUTO lets the
    exporter find the relations (total_len = past_len + step_len); contract names are put back
    after."""
    auto = torch.export.Dim.AUTO
    specs = [{axis: auto for axis in t.dynamic_axes()} for t in contract.inputs]
    n = len(specs) - contract.cache_inputs
    return (*specs[:n], tuple(specs[n:])) if contract.cache_inputs else tuple(specs)


def _name_axes(proto: onnx.ModelProto, contract: GraphContract) -> None:
    """Replace the exporter's symbols (s10, 's15 + s69') on graph inputs and outputs by the
    contract's axis names, and check fixed sizes against the contract."""
    by_name = {t.name: t for t in (*contract.inputs, *contract.outputs)}
    for value in (*proto.graph.input, *proto.graph.output):
        spec = by_name.get(value.name)
        if spec is None:
            raise ExportValidationError(f"the exported graph has a tensor the contract does not know: {value.name!r}")
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(spec.shape):
            raise ExportValidationError(f"exported tensor {value.name!r} has rank {len(dims)}, "
                                        f"the contract says {len(spec.shape)}")
        for dim, want in zip(dims, spec.shape):
            if isinstance(want, str):
                dim.ClearField("dim_value")
                dim.dim_param = want
            elif dim.HasField("dim_value") and dim.dim_value != want:
                raise ExportValidationError(f"exported tensor {value.name!r} has size {dim.dim_value} "
                                            f"where the contract says {want}")


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


@contextlib.contextmanager
def _known_warnings_silenced() -> Iterator[None]:
    """The exporter's notices that never concern v2t's graphs: it skips torchvision's operators
    (not installed; v2t uses none) and trips over its own deprecated LeafSpec. Other warnings
    still show."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


@torch.no_grad()
def export_onnx(model: VideoCaptioner, out_dir: str | Path) -> tuple[Path, Path]:
    """Write the frame encoder and the decoder graph into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    cfg = model.cfg
    # Sizes of at least 2, all different, on every dynamic axis: torch.export specializes axes
    # whose example size is 0 or 1, and could tie axes of equal size.
    graphs = ((EncoderGraph(model), encoder_contract(cfg), {NUM_FRAMES: 3}, ENCODER_FILE),
              (DecoderGraph(model), decoder_contract(cfg), decoder_sizes(2, 4, 3, 5), DECODER_FILE))
    paths = []
    with _known_warnings_silenced():
        for module, contract, sizes, file in graphs:
            log.info("exporting the %s", contract.name)
            paths.append(_export(module.eval(), _example(contract, sizes, cfg.vocab_size), contract,
                                 _auto_dynamic_shapes(contract), out_dir / file))
    return paths[0], paths[1]

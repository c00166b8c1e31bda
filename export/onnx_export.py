"""Split a VideoCaptioner into the ONNX graphs of v2t_engine.contract: a frame encoder that
takes uint8 crops, a prefill over each video's frames, and a decode step over a fixed-length
KV buffer."""
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
from v2t_engine.inputs.preprocess import NORMALIZE_TABLE
from v2t_engine.runtime.contract import (BATCH, CACHE_LEN, DECODE_FILE, ENCODER_FILE, NUM_FRAMES, PREFILL_FILE,
                                         PREFIX_LEN, GraphContract, decode_contract, encoder_contract,
                                         prefill_contract)
from v2t_training.model import VideoCaptioner

log = logging.getLogger(__name__)

# The dynamo exporter at opset 17 writes a Split with an attribute opset 17 lacks (the graph
# then fails onnx.checker); 18 is the lowest opset it gets right.
OPSET = 18
# Protobuf cannot hold a single file over 2 GiB: larger graphs keep weights in a side file.
_EXTERNAL_DATA_BYTES = 1_800_000_000


class EncoderGraph(nn.Module):
    """uint8 crops → frame embeddings. CLIP normalisation is a lookup in preprocess's own table
    (channel c's value v at index 256 c + v), so the graph's pixels are the host's bit for bit."""

    def __init__(self, model: VideoCaptioner):
        super().__init__()
        self.vit = model.first_stage_model
        self.register_buffer("table", torch.from_numpy(NORMALIZE_TABLE.copy()).reshape(-1))
        self.register_buffer("offset", (torch.arange(3) * 256).view(1, 3, 1, 1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.vit(self.table[frames.long() + self.offset])  # (N, 3, S, S) → (N, E)


class PrefillGraph(nn.Module):
    """The model's own forward over the frames from an empty past; the cache flattened in
    contract order (layer-major, key first)."""

    def __init__(self, model: VideoCaptioner):
        super().__init__()
        self.decoder = model.transformer

    def forward(self, prefix_embeds):
        empty = torch.zeros(prefix_embeds.shape[0], 0, dtype=torch.long)
        logits, present = self.decoder(empty, prefix_embeds, last_only=True)
        return (logits, *[t for kv in present for t in kv])


class DecodeGraph(nn.Module):
    def __init__(self, model: VideoCaptioner):
        super().__init__()
        self.decoder = model.transformer
        self.n_layer = model.cfg.n_layer

    def forward(self, input_ids, position_ids, *cache_flat):
        cache = [(cache_flat[2 * i], cache_flat[2 * i + 1]) for i in range(self.n_layer)]
        logits, new = self.decoder.decode(input_ids, position_ids, cache)
        return (logits, *[t for kv in new for t in kv])


def _example(contract: GraphContract, sizes: dict[str, int], vocab_size: int) -> tuple:
    """The contract's example inputs, in contract order, as the traced module's arguments."""
    return tuple(torch.from_numpy(a.copy()) for a in contract.example(sizes, vocab_size=vocab_size).values())


def _auto_dynamic_shapes(contract: GraphContract):
    """torch.export dynamic_shapes for the contract's symbolic axes: one entry per leading input,
    and one tuple for the KV cache, which the module takes as ``*cache``. Dim.AUTO lets the
    exporter find which axes are the same; contract names are put back after."""
    auto = torch.export.Dim.AUTO
    specs = [{axis: auto for axis in t.dynamic_axes()} for t in contract.inputs]
    n = len(specs) - contract.cache_inputs
    return (*specs[:n], tuple(specs[n:])) if contract.cache_inputs else tuple(specs)


def _name_axes(proto: onnx.ModelProto, contract: GraphContract) -> None:
    """Replace the exporter's symbols (s10, s15) on graph inputs and outputs by the contract's
    axis names, and check fixed sizes against the contract."""
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
def export_onnx(model: VideoCaptioner, out_dir: str | Path) -> dict[str, Path]:
    """Write the frame encoder, prefill and decode graphs into out_dir; their paths by graph name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    cfg = model.cfg
    # Sizes of at least 2, all different, on every dynamic axis: torch.export specializes axes
    # whose example size is 0 or 1, and could tie axes of equal size.
    graphs = ((EncoderGraph(model), encoder_contract(cfg), {NUM_FRAMES: 3}, ENCODER_FILE),
              (PrefillGraph(model), prefill_contract(cfg), {BATCH: 2, PREFIX_LEN: 3}, PREFILL_FILE),
              (DecodeGraph(model), decode_contract(cfg), {BATCH: 2, CACHE_LEN: 5}, DECODE_FILE))
    paths = {}
    with _known_warnings_silenced():
        for module, contract, sizes, file in graphs:
            log.info("exporting the %s", contract.name)
            paths[contract.name] = _export(module.eval(), _example(contract, sizes, cfg.vocab_size), contract,
                                           _auto_dynamic_shapes(contract), out_dir / file)
    return paths

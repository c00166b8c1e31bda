"""fp16 and bf16 copies of the exported fp32 graphs (frame_encoder, prefill, decode): an
ONNX-graph rewrite after the fp32 export, as quantize.py does for int8.

What stays float32, and why:
- LayerNormalization: its variance overflows fp16 (NVIDIA's captioning demo had to build its
  vision encoder in fp32 for that). The exporter writes each norm as one LayerNormalization op
  (opset >= 17), so there is no decomposed norm to find; tests/test_half_precision.py checks it.
- Softmax: exp() of attention scores overflows fp16, and its sum is where rounding hurts most.
- The head (the MatMul/Gemm that makes the logits, and any data movement or bias Add between it
  and the output) with its input: greedy search compares logits, and a near tie rounded to half
  flips a token and with it the rest of the caption.
- Every graph input and output, so the contract, the ONNX Runtime backend and the C++ runtime
  read a half export exactly as they read an fp32 one: decode's KV buffer arrives fp32 and the
  kv_out.* of prefill and decode leave fp32 (a half value cast up is exact, so the buffer holds
  what the half graph computed).
- Attention over a float graph input, an fp32 island (`_input_islands`): in decode, the q·Kᵀ
  and att·V MatMuls that read the fp32 KV buffer, and the weight-free arithmetic around them
  (query scaling, the masking Where, the step's own score q·k and its share att_own·v, the
  Concat, Softmax and Slices, the sum into y). The buffer is read once per step, as it comes:
  no Cast ever touches it. Casting it to half would be a whole extra pass over the largest
  tensor of a step (read fp32, write half, read half) to save arithmetic on what is a
  memory-bound matrix-vector product per row. It would also turn any buffer value past fp16's
  range into inf, and a masked column's weight 0 times inf is NaN in the whole row (the runtime
  zeroes unwritten columns and a half graph writes values in range, so that is a guard for
  other callers' buffers, not a case the runtime makes). The casts sit on (B, nh, 1, hs)-sized values instead: q, the step's own key
  and value cast up (which are kv_out, so the island reads the very tensors that leave the
  graph), y cast down before the output projection. The own score is computed in fp32 like the
  cached ones, so the Softmax compares scores computed alike.
Everything else (MatMul, Gemm, Conv, GELU, the residual Adds, the embeddings, the encoder's and
prefill's attention) computes in the half type, with its weights stored in it.

Masks stay valid in half: decode masks with a Where (it selects, no arithmetic) in its fp32
island; prefill's causal mask is Where(tril, 0, -inf) added to the half scores, and -inf is kept
as -inf (x + -inf = -inf for every finite score; only an overflowed +inf score would make NaN,
and the exporter scales q and k by hs^-1/4 each before their MatMul, so it writes scores already
divided by sqrt(hs), never the larger unscaled products). A finite mask value past the half type's range,
such as float32's minimum, saturates to the type's largest finite value instead of becoming
-inf, so a 0 * mask stays 0 rather than -inf * 0 = NaN (`half_tensor`). Every Softmax row keeps
a visible column (the diagonal in prefill, the step's own key in decode).

Ops that only move or select data (Reshape, Gather, Concat...) compute in whatever type their
inputs come in, so an fp32 value is not rounded to half on its way from a LayerNorm into the
head. Where they move weights alone (an embedding Gather, the encoder's normalisation table, a
constant mask) they take the type of their consumers (`_type_by_consumers`). The frame encoder's
first op gathers CLIP's normalisation from a 768-entry table: ahead of an fp16 Conv the table is
stored fp16, which is bit for bit the fp32 lookup cast to half (rounding is per element), without
an fp32 pass over the frames; ahead of a bf16 export's fp32 Conv (below) it stays fp32, exactly
the host's `preprocess.normalize`. Either way the pixels the ViT reads are the host's rounded
once to the type the ViT computes in, so captions change only by what half precision of the ViT
itself causes.

A Cast is inserted wherever a value meets a consumer of the other type; weights shared by fp32
and half consumers are stored once in each type (no Cast runs on a weight). The rewritten graph
must pass `onnx.checker.check_model(full_check=True)`, which runs strict type inference.

TensorRT 11 builds strongly typed networks only, so these graphs carry their precision into an
engine as they are (GPU-NOTES.md).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from v2t_engine.errors import ExportValidationError
from v2t_engine.runtime.contract import LOGITS

from v2t_export.onnx_export import _EXTERNAL_DATA_BYTES

log = logging.getLogger(__name__)

FLOAT = TensorProto.FLOAT
HALF_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
FP32_OPS = frozenset({"LayerNormalization", "Softmax", "LogSoftmax"})
# Ops that move or select data without arithmetic: any float type computes them exactly.
FOLLOW_OPS = frozenset({"Concat", "Expand", "Flatten", "Gather", "GatherElements", "GatherND", "Identity",
                        "Reshape", "Slice", "Split", "Squeeze", "Tile", "Transpose", "Unsqueeze", "Where"})
# Ops that read only a float input's shape, or take any type by definition: no Cast in front.
TYPE_BLIND_OPS = frozenset({"Shape", "Size", "Cast"})
# The work the half type is for: an fp32 island never grows into one of these (`_input_islands`).
HEAVY_OPS = frozenset({"MatMul", "Gemm", "Conv"})
_SCHEMA_TYPES = {TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)"}
_FP16_MAX = float(np.finfo(np.float16).max)
_BF16_MAX = 3.3895313892515355e38


def to_half_graph(path: Path, precision: str) -> None:
    """Rewrite the fp32 graph file at `path` in place to `precision` ("fp16" or "bf16")."""
    log.info("converting %s to %s", path.name, precision)
    model = convert_model(onnx.load(str(path)), HALF_TYPES[precision], keep_fp32_outputs={LOGITS})
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    external = model.ByteSize() > _EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=external,
                    location=path.name + ".data" if external else None)


def convert_model(model: onnx.ModelProto, half: int, keep_fp32_outputs: set[str]) -> onnx.ModelProto:
    """A copy of `model` computing in `half` except where the module docstring says; graph inputs
    and outputs keep their types. `keep_fp32_outputs`: outputs whose head (`_head_nodes`) stays
    fp32."""
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = model.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportValidationError(f"half conversion: node {node.name!r} ({node.op_type}) has a "
                                        "subgraph, which this converter does not handle")
    _hoist_constants(graph)
    types = _elem_types(graph)
    free = {i.name for i in graph.initializer if i.data_type == FLOAT}  # typed by their consumers
    fp32_nodes = _head_nodes(graph, keep_fp32_outputs) | _input_islands(graph, types, free)
    modes, dtype = _plan(graph, model.opset_import, types, free, half, fp32_nodes)
    weights = _convert_initializers(graph, modes, types, free, half)
    _rewrite_nodes(graph, modes, types, dtype, weights, half)
    _retype_value_info(graph, dtype)
    onnx.checker.check_model(model, full_check=True)
    return model


def _hoist_constants(graph: onnx.GraphProto) -> None:
    """Float Constant nodes become initializers, so they are typed by their consumers as
    weights are."""
    keep = []
    for node in graph.node:
        value = [a for a in node.attribute if a.name == "value"]
        if node.op_type == "Constant" and len(node.attribute) == 1 and value and value[0].t.data_type == FLOAT:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({i.name: i.data_type for i in graph.initializer})
    return types


def _float_inputs(node: onnx.NodeProto, types: dict[str, int]) -> list[str]:
    """The inputs whose type the node's compute type decides."""
    if node.op_type in TYPE_BLIND_OPS:
        return []
    return [x for x in node.input if x and types.get(x) == FLOAT]


def _head_nodes(graph: onnx.GraphProto, outputs: set[str]) -> set[int]:
    """Indices of the nodes from each of `outputs` back to (and with) the MatMul/Gemm that makes
    it, through data movement and bias Adds."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    found: set[int] = set()
    todo = [producer[name] for name in outputs if name in producer]
    while todo:
        i = todo.pop()
        if i in found:
            continue
        found.add(i)
        node = graph.node[i]
        if node.op_type in FOLLOW_OPS or node.op_type == "Add":
            todo += [producer[x] for x in node.input if x in producer]
        elif node.op_type not in ("MatMul", "Gemm"):
            raise ExportValidationError(f"half conversion: the head of {sorted(outputs)} reaches "
                                        f"{node.op_type} node {node.name!r} before any MatMul/Gemm")
    return found


def _input_islands(graph: onnx.GraphProto, types: dict[str, int], free: set[str]) -> set[int]:
    """Indices of the nodes that attend over a float graph input (decode's KV buffer), to keep in
    fp32 (module docstring). Seeds: each MatMul of two activations, one of them a graph input
    or a data-movement view of it (the cache's Transpose). From there the island takes every
    neighbour, producer or consumer, that has no weight (a scalar constant is no weight: the
    query scale, the mask's -inf) and is not heavy, so it stops at the projections around the
    attention and never reaches the residual stream. Graphs without float inputs (the encoder)
    or whose float input feeds no such MatMul (prefill) have none."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    readers: dict[str, list[int]] = defaultdict(list)
    for j, node in enumerate(graph.node):
        for x in _float_inputs(node, types):
            readers[x].append(j)
    viewed = {v.name for v in graph.input if types.get(v.name) == FLOAT}
    for node in graph.node:
        if node.op_type in FOLLOW_OPS and viewed.intersection(node.input):
            viewed.update(node.output)
    weights = {i.name for i in graph.initializer if i.name in free and int(np.prod(i.dims)) > 1}

    def joins(j: int) -> bool:
        return graph.node[j].op_type not in HEAVY_OPS and not weights.intersection(graph.node[j].input)

    todo = [i for i, node in enumerate(graph.node) if node.op_type == "MatMul"
            and viewed.intersection(node.input) and not weights.intersection(node.input)]
    island: set[int] = set()
    while todo:
        i = todo.pop()
        if i in island:
            continue
        island.add(i)
        node = graph.node[i]
        near = [producer[x] for x in _float_inputs(node, types) if x in producer]
        near += [j for out in node.output for j in readers[out]]
        todo += [j for j in near if j not in island and joins(j)]
    return island


def _plan(graph: onnx.GraphProto, model_opsets, types: dict[str, int], free: set[str], half: int,
          fp32_nodes: set[int]) -> tuple[list[int], dict[str, int]]:
    """Each node's compute type, and the type each float tensor will have. `fp32_nodes`: the
    head and the islands, by index."""
    dtype = {v.name: FLOAT for v in graph.input if types.get(v.name) == FLOAT}
    modes: list[int | None] = []
    opset = {o.domain: o.version for o in model_opsets}
    derived = set(free)  # weights, and data moved out of weights alone
    for i, node in enumerate(graph.node):
        floats = _float_inputs(node, types)
        if node.op_type in FP32_OPS or i in fp32_nodes or not _has_type(node, half, opset):
            mode = FLOAT
        elif node.op_type in FOLLOW_OPS:
            fixed = {dtype[x] for x in floats if x not in derived}
            if floats and not fixed:  # weights alone: typed by its consumers (_type_by_consumers)
                derived.update(out for out in node.output if types.get(out) == FLOAT)
                modes.append(None)
                continue
            mode = FLOAT if FLOAT in fixed else half  # mixed inputs meet in fp32, which holds both
        else:
            mode = half
        modes.append(mode)
        for out in node.output:
            if types.get(out) == FLOAT:
                dtype[out] = mode
    _type_by_consumers(graph, types, modes, dtype, half)
    return modes, dtype


def _type_by_consumers(graph: onnx.GraphProto, types: dict[str, int], modes: list[int | None],
                       dtype: dict[str, int], half: int) -> None:
    """Data moved out of weights alone computes in fp32 where any consumer reads it in fp32 (or
    it is a graph output), else in half: the normalisation table ahead of a bf16 export's fp32
    Conv stays exact, and ahead of an fp16 Conv it is gathered in fp16, bit for bit the fp32
    lookup cast to half. Consumers come later in the graph's order, so a backward sweep sees
    each decided."""
    readers: dict[str, list[int]] = defaultdict(list)
    for j, node in enumerate(graph.node):
        for x in _float_inputs(node, types):
            readers[x].append(j)
    graph_outputs = {o.name for o in graph.output}
    for i in reversed(range(len(graph.node))):
        if modes[i] is not None:
            continue
        outs = [o for o in graph.node[i].output if types.get(o) == FLOAT]
        fp32 = any(o in graph_outputs or any(modes[j] == FLOAT for j in readers[o]) for o in outs)
        modes[i] = FLOAT if fp32 else half
        dtype.update({o: modes[i] for o in outs})


def _has_type(node: onnx.NodeProto, half: int, opset: dict[str, int]) -> bool:
    """Whether the node's op, at the graph's opset, takes the half type wherever it takes float32.
    Conv has no bfloat16 before opset 22 (the graphs are opset 18): in a bf16 export the ViT's
    patch embedding stays fp32, a few percent of the encoder's work, on an fp32 input anyway."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset.get(node.domain, 1), node.domain)
    except onnx.defs.SchemaError:
        return False  # an op this onnx does not know: leave it as exported
    return all(_SCHEMA_TYPES[half] in c.allowed_type_strs for c in schema.type_constraints
               if "tensor(float)" in c.allowed_type_strs)


def _convert_initializers(graph: onnx.GraphProto, modes: list[int], types: dict[str, int],
                          free: set[str], half: int) -> dict[tuple[str, int], str]:
    """Store each float weight in the type(s) its consumers compute in. Returns (name, type) →
    the initializer holding it."""
    wanted: dict[str, set[int]] = defaultdict(set)
    for node, mode in zip(graph.node, modes):
        for x in _float_inputs(node, types):
            if x in free:
                wanted[x].add(mode)
    weights = {}
    for init in list(graph.initializer):
        if init.name not in free:
            continue
        weights[(init.name, FLOAT)] = init.name
        if half not in wanted[init.name]:
            continue
        converted = half_tensor(numpy_helper.to_array(init), half, init.name)
        if FLOAT in wanted[init.name]:  # fp32 consumers too: a second copy, in the half type
            converted.name = f"{init.name}__{_type_name(half)}"
            graph.initializer.append(converted)
        else:
            init.CopyFrom(converted)
            del weights[(init.name, FLOAT)]
        weights[(init.name, half)] = converted.name
    return weights


def _rewrite_nodes(graph: onnx.GraphProto, modes: list[int], types: dict[str, int], dtype: dict[str, int],
                   weights: dict[tuple[str, int], str], half: int) -> None:
    """Point each float input at a value of its node's compute type, casting where it has the
    other type; a half producer of a graph output writes a half tensor that is cast back right
    after it, and an fp32 consumer of that output reads the cast (no second Cast)."""
    outputs = {o.name for o in graph.output if types.get(o.name) == FLOAT and dtype.get(o.name) == half}
    renamed = {name: f"{name}__{_type_name(half)}" for name in outputs}
    casts: dict[tuple[str, int], str] = {}
    nodes = []

    def source(name: str, want: int) -> str:
        if (name, want) in weights:
            return weights[(name, want)]
        name_now = renamed.get(name, name)
        if dtype[name] == want:
            return name_now
        if (name, want) not in casts:
            casts[(name, want)] = cast = f"{name}__to_{_type_name(want)}"
            nodes.append(helper.make_node("Cast", [name_now], [cast], to=want, name=cast))
            dtype[cast] = want
            _copy_value_info(graph, name, cast, want)
        return casts[(name, want)]

    for node, mode in zip(list(graph.node), modes):
        floats = set(_float_inputs(node, types))
        node.input[:] = [source(x, mode) if x in floats else renamed.get(x, x) for x in node.input]
        if mode == half:
            _retype_attributes(node, half)
        nodes.append(node)
        for i, name in enumerate(node.output):
            if name in renamed:
                node.output[i] = renamed[name]
                nodes.append(helper.make_node("Cast", [renamed[name]], [name], to=FLOAT, name=f"{name}__to_float"))
                casts[(name, FLOAT)] = name
                _copy_value_info(graph, name, renamed[name], half)
                dtype[renamed[name]] = half
    del graph.node[:]
    graph.node.extend(nodes)


def _retype_attributes(node: onnx.NodeProto, half: int) -> None:
    """A half node's float-making attributes: Cast's target, a tensor value (ConstantOfShape)."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = half
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(half_tensor(numpy_helper.to_array(attr.t), half, attr.t.name))


def _copy_value_info(graph: onnx.GraphProto, name: str, new_name: str, elem_type: int) -> None:
    """Declare `new_name` with `name`'s shape and `elem_type`."""
    for info in (*graph.value_info, *graph.input, *graph.output):
        if info.name == name:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(info)
            copy.name = new_name
            copy.type.tensor_type.elem_type = elem_type
            graph.value_info.append(copy)
            return


def _retype_value_info(graph: onnx.GraphProto, dtype: dict[str, int]) -> None:
    """The exporter declares every tensor's type, weights included: declare the new ones."""
    stored = {i.name: i.data_type for i in graph.initializer}
    for info in graph.value_info:
        if info.type.tensor_type.elem_type == FLOAT:
            info.type.tensor_type.elem_type = stored.get(info.name, dtype.get(info.name, FLOAT))


def _type_name(elem_type: int) -> str:
    return {FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}[elem_type]


def half_tensor(values: np.ndarray, half: int, name: str) -> onnx.TensorProto:
    """float32 values as a `half` tensor. Finite values past the type's range saturate to its
    largest value instead of becoming infinite (a mask's float32 minimum must stay finite); inf
    and NaN stay as they are."""
    values = np.asarray(values, np.float32)
    limit = _FP16_MAX if half == TensorProto.FLOAT16 else _BF16_MAX
    values = np.where(np.isfinite(values), np.clip(values, -limit, limit), values).astype(np.float32)
    if half == TensorProto.FLOAT16:
        return numpy_helper.from_array(values.astype(np.float16), name)
    return helper.make_tensor(name, TensorProto.BFLOAT16, values.shape,
                              bf16_bits(values).astype("<u2").tobytes(), raw=True)


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → the uint16 bits of bfloat16, rounding to nearest even (numpy has no bfloat16):
    add 0x7FFF plus the lowest kept bit, then drop the low 16 bits."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    # NaN must stay NaN: rounding could carry its payload into the exponent (or to inf).
    rounded = np.where(np.isnan(values), (bits >> 16) | 0x40, rounded)
    return rounded.astype(np.uint16)

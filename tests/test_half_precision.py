"""`v2t export --precision fp16|bf16` (issue #10): the graphs compute in the half type except
LayerNorm, Softmax and the head, which stay fp32; their inputs and outputs are the fp32 export's;
the manifest says whether validation ran. ONNX Runtime's CPU provider runs fp16 graphs (so fp16
exports are validated here) but has no bfloat16 kernels (so bf16 exports record validation as
pending, and loading one on the CPU is refused with the reason)."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from v2t_engine.cli import main
from v2t_engine.errors import ConfigError
from v2t_engine.runtime.backends.ort import OrtBackend
from v2t_engine.runtime.captioner import Captioner
from v2t_engine.runtime.contract import (DECODER_FILE, ENCODER_FILE, LOGITS, MANIFEST_FILE, NUM_FRAMES,
                                         decoder_contract, decoder_sizes, encoder_contract)
from v2t_engine.runtime.manifest import Manifest
from v2t_export.half import bf16_bits, convert_model, to_half_graph

FLOAT, FP16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
HALF = {"fp16": FP16, "bf16": BF16}
FLOATS = {FLOAT, FP16, BF16}
GRAPHS = (ENCODER_FILE, DECODER_FILE)
# Share of greedy captions an fp16 export must give as the fp32 one does on the held-out clips.
# Measured 100% on this fixture (and on 64 random videos); random weights make near ties, where a
# rounding may flip a token, more likely than a trained model does.
MIN_FP16_CAPTION_AGREEMENT = 0.9


def export(checkpoint, tmp_path_factory, precision):
    out = tmp_path_factory.mktemp(precision) / "onnx"
    run_cli(["export", "--checkpoint_dir", checkpoint, "--output", out, "--precision", precision])
    return out


@pytest.fixture(scope="module")
def fp16_export(random_checkpoint, tmp_path_factory):
    return export(random_checkpoint, tmp_path_factory, "fp16")


@pytest.fixture(scope="module")
def bf16_export(random_checkpoint, tmp_path_factory):
    return export(random_checkpoint, tmp_path_factory, "bf16")


@pytest.fixture(params=["fp16", "bf16"])
def half_export(request):
    """A real `v2t export --precision` (traced, converted, validated where it can run): the slow
    tier; the structure tests read `half_graphs`, the same conversion of the fast tier's export."""
    return request.param, request.getfixturevalue(f"{request.param}_export")


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def half_graphs(request, random_export, tmp_path_factory):
    """The fp32 export's graphs through the converter `v2t export --precision` runs on them."""
    out = tmp_path_factory.mktemp(f"{request.param}_graphs") / "onnx"
    shutil.copytree(random_export, out)
    for graph_file in GRAPHS:
        to_half_graph(out / graph_file, request.param)
    return request.param, out


def manifest(export_dir):
    return json.loads((export_dir / MANIFEST_FILE).read_text(encoding="utf-8"))


def float_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every float tensor's element type: declared values and weights."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    return {name: t for name, t in types.items() if t in FLOATS}


def node_types(node: onnx.NodeProto, types: dict[str, int]) -> set[int]:
    """The float types a node reads and writes."""
    return {types[x] for x in (*node.input, *node.output) if x in types}


def test_norms_softmax_and_head_compute_in_fp32_everything_else_in_half(half_graphs):
    precision, out = half_graphs
    half = HALF[precision]
    for graph_file in GRAPHS:
        model = onnx.load(str(out / graph_file))
        types = float_types(model)
        ops = [n.op_type for n in model.graph.node]
        # Each norm is one LayerNormalization op, not a decomposition that could hide in half.
        assert ops.count("LayerNormalization") >= 2 and "ReduceMean" not in ops
        for node in model.graph.node:
            kinds = node_types(node, types)
            if node.op_type in ("LayerNormalization", "Softmax") or LOGITS in node.output:
                assert kinds == {FLOAT}, f"{graph_file}: {node.op_type} {node.name} computes in {kinds}"
            elif node.op_type == "Conv" and precision == "bf16":
                assert kinds == {FLOAT}  # opset 18's Conv has no bfloat16 (half.py)
            elif node.op_type in ("MatMul", "Gemm", "Conv") or (
                    node.op_type in ("Add", "Mul", "Div", "Erf", "Sigmoid") and kinds):  # not index sums
                assert kinds == {half}, f"{graph_file}: {node.op_type} {node.name} computes in {kinds}"
        matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and LOGITS not in n.output]
        assert len(matmuls) >= 8
        # The weights are stored half, not cast at run time: the graph file shrank.
        weights = [i for i in model.graph.initializer if len(i.dims) == 2]
        assert sum(i.data_type == half for i in weights) > sum(i.data_type == FLOAT for i in weights)


def test_the_head_reads_its_input_and_weight_in_fp32(half_graphs):
    _, out = half_graphs
    model = onnx.load(str(out / DECODER_FILE))
    types = float_types(model)
    (head,) = [n for n in model.graph.node if LOGITS in n.output]
    assert head.op_type in ("MatMul", "Gemm")
    assert all(types[x] == FLOAT for x in head.input if x)
    weight = {i.name: i for i in model.graph.initializer}[head.input[1]]
    assert weight.data_type == FLOAT


def io_types(graph_path):
    g = onnx.load(str(graph_path)).graph
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in (*g.input, *g.output)]


def test_graph_inputs_and_outputs_are_the_fp32_exports(half_graphs, random_export):
    _, out = half_graphs
    for graph_file in GRAPHS:
        assert io_types(out / graph_file) == io_types(random_export / graph_file)


@pytest.mark.slow
def test_manifest_records_the_precision_and_validation_honestly(half_export, random_export):
    precision, out = half_export
    m = manifest(out)
    assert m["graphs"] == manifest(random_export)["graphs"]
    v = m["validation"]
    assert m["precision"] == v["precision"] == precision
    if precision == "fp16":  # ONNX Runtime's CPU provider runs it: validated here
        assert v["validated"] is True and v["device"] == "cpu"
        assert v["greedy_token_agreement"] >= v["min_greedy_agreement"] == 0.9
        assert v["decoder_logits_max_abs_diff"] < v["relative_tolerance"] * 10
        assert Manifest.load(out).validated
    else:  # it cannot: nothing was measured, and the manifest says why and what to run
        assert v["validated"] is False and v["greedy_token_agreement"] is None
        assert "bfloat16" in v["reason"] and "--device cuda" in v["reason"]
        assert not any(k.endswith("_diff") or k.startswith("greedy_tokens") for k in v)
        assert not Manifest.load(out).validated


@pytest.mark.slow
def test_bf16_export_is_refused_on_the_cpu_with_the_reason(bf16_export):
    with pytest.raises(ConfigError, match=r"bf16 export: .*bfloat16.*--device cuda"):
        OrtBackend(bf16_export)
    with pytest.raises(ConfigError, match="--device cuda"):
        Captioner.load(bf16_export)


@pytest.mark.slow
def test_fp16_greedy_captions_agree_with_fp32(fp16_export, random_export, test_pixels):
    want = Captioner.load(random_export).caption_pixels(test_pixels)
    got = Captioner.load(fp16_export).caption_pixels(test_pixels)
    assert np.mean([a == b for a, b in zip(got, want)]) >= MIN_FP16_CAPTION_AGREEMENT


def test_half_graphs_compute_what_the_fp32_graphs_do(half_graphs, random_export):
    """onnx's reference evaluator runs bfloat16 where ONNX Runtime's CPU provider cannot: a check
    of the rewrite (every Cast in its place), not a validation of a runtime. Relative error of the
    order of the type's rounding (2^-11 fp16, 2^-8 bf16) through a few layers."""
    from onnx.reference import ReferenceEvaluator

    precision, out = half_graphs
    tolerance = {"fp16": 1e-2, "bf16": 5e-2}[precision]
    cfg = Manifest.load(random_export).config
    cases = ((ENCODER_FILE, encoder_contract(cfg).example({NUM_FRAMES: 3}, seed=1)),
             (DECODER_FILE, decoder_contract(cfg).example(decoder_sizes(2, 1, 4, 5), seed=1,
                                                          vocab_size=cfg.vocab_size)))
    for graph_file, feeds in cases:
        want = ort.InferenceSession(str(random_export / graph_file)).run(None, feeds)
        with np.errstate(over="ignore", invalid="ignore"):  # the reference Sigmoid's exp() in half
            got = ReferenceEvaluator(str(out / graph_file)).run(None, feeds)
        for g, w in zip(got, want):
            assert g.dtype == np.float32
            assert np.abs(g - w).max() <= tolerance * np.abs(w).max(), graph_file


def test_export_device_cuda_without_a_cuda_onnxruntime_is_refused_before_any_work(tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    result = CliRunner().invoke(main, ["export", "--checkpoint_dir", str(tmp_path / "ck"), "--output",
                                       str(tmp_path / "bf16"), "--precision", "bf16", "--device", "cuda"])
    assert result.exit_code == 1 and "CUDAExecutionProvider" in result.output
    assert not (tmp_path / "bf16").exists()


# ------------------------------------------------------------------------- the converter alone
def small_model() -> onnx.ModelProto:
    """x → MatMul(w) → Add(b) → y, and LayerNorm(y; scale, b) → z: a half node writes a graph
    output, and the bias b is read by a half Add and an fp32 LayerNorm."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
             numpy_helper.from_array(np.ones(8, np.float32), "scale")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"]),
             helper.make_node("LayerNormalization", ["y", "scale", "b"], ["z"], axis=-1)]
    io = {n: helper.make_tensor_value_info(n, FLOAT, ["n", 4 if n == "x" else 8]) for n in "xyz"}
    graph = helper.make_graph(nodes, "small", [io["x"]], [io["y"], io["z"]], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_converter_casts_half_outputs_back_and_stores_shared_weights_in_both_types():
    fp32 = small_model()
    model = convert_model(fp32, FP16, keep_fp32_outputs=set())
    assert io_types_of(model) == io_types_of(fp32)
    stored = {i.name: i.data_type for i in model.graph.initializer}
    assert stored["w"] == FP16 and stored["scale"] == FLOAT and stored["b"] == FLOAT
    (b_half,) = [name for name, t in stored.items() if t == FP16 and name != "w"]  # for the Add
    (add,) = [n for n in model.graph.node if n.op_type == "Add"]
    (norm,) = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert b_half in add.input and "b" in norm.input
    producer = {out: n for n in model.graph.node for out in n.output}
    assert producer["y"].op_type == "Cast"  # the half Add writes a half tensor, cast back to fp32
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    want = ort.InferenceSession(fp32.SerializeToString()).run(None, {"x": x})
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and np.allclose(g, w, rtol=1e-2, atol=1e-2)


def io_types_of(model):
    g = model.graph
    return [(v.name, v.type.tensor_type.elem_type) for v in (*g.input, *g.output)]


def test_bf16_rounds_to_nearest_even_and_keeps_specials():
    ml_dtypes = pytest.importorskip("ml_dtypes")  # installed with onnx; the reference rounding
    values = np.concatenate([
        np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 1e3,
        # exact ties between two bf16 values (round to the even one), the smallest subnormal,
        # the largest finite float32 (rounds up to inf, as bfloat16 conversion does)
        np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1e-45, 3.4028235e38, 0.0, -0.0],
                 np.float32)])
    want = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(bf16_bits(values), want)
    special = np.array([np.inf, -np.inf, np.nan], np.float32)
    back = (bf16_bits(special).astype(np.uint32) << 16).view(np.float32)
    assert back[0] == np.inf and back[1] == -np.inf and np.isnan(back[2])

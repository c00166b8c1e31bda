"""`v2t export --precision`: int8 graphs are validated against PyTorch with their agreement
recorded and keep the captions of the synthetic test clips."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import TEST_SCHEMA, run_cli
from v2t_engine.runtime.captioner import Captioner
from v2t_engine.cli import main
from v2t_engine.inputs.frames import FrameSource, row_frames_or_error
from v2t_engine.inputs.tables import InputSchema, read_table

QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeMatMul"}


def export(checkpoint, out, precision, *extra):
    run_cli(["export", "--checkpoint_dir", checkpoint, "--output", out, "--precision", precision, *extra])
    return out


def manifest(export_dir):
    return json.loads((export_dir / "manifest.json").read_text(encoding="utf-8"))


def quantized(graph_path) -> bool:
    return bool(QUANTIZED_OPS & {n.op_type for n in onnx.load(str(graph_path)).graph.node})


@pytest.fixture(scope="module")
def int8_encoder_dir(trained_checkpoint, tmp_path_factory):
    return export(trained_checkpoint, tmp_path_factory.mktemp("int8_encoder") / "onnx", "int8_encoder")


@pytest.mark.slow
def test_int8_encoder_export_is_quantized_validated_and_reports_agreement(int8_encoder_dir):
    m = manifest(int8_encoder_dir)
    assert m["precision"] == "int8_encoder"
    assert quantized(int8_encoder_dir / "frame_encoder.onnx")
    assert not quantized(int8_encoder_dir / "prefill.onnx") and not quantized(int8_encoder_dir / "decode.onnx")
    v = m["validation"]
    assert v["precision"] == "int8_encoder" and v["min_greedy_agreement"] == 0.9
    assert v["greedy_token_agreement"] >= 0.9
    assert 0.0 <= v["greedy_caption_agreement"] <= 1.0
    assert v["frame_encoder_max_abs_diff"] < v["relative_tolerance"]


@pytest.mark.slow
def test_int8_encoder_keeps_the_captions_of_the_test_clips(int8_encoder_dir, trained_export, recipe_data):
    rows = list(read_table(recipe_data["test"], InputSchema.parse(TEST_SCHEMA)))
    fp32 = Captioner.load(trained_export)
    cfg = fp32.config
    pixels = np.stack([row_frames_or_error(r, "imgbase64", cfg.frame_num, cfg.img_size, FrameSource())[0]
                       for r in rows])
    want = fp32.caption_pixels(pixels)
    got = Captioner.load(int8_encoder_dir).caption_pixels(pixels)
    assert np.mean([a == b for a, b in zip(got, want)]) >= 0.98


@pytest.mark.slow
def test_int8_quantizes_every_graph_and_reports_agreement(trained_checkpoint, tmp_path):
    out = export(trained_checkpoint, tmp_path / "int8", "int8", "--min_agreement", "0.95")
    assert all(quantized(out / f) for f in ("frame_encoder.onnx", "prefill.onnx", "decode.onnx"))
    v = manifest(out)["validation"]
    assert v["min_greedy_agreement"] == 0.95  # the user's threshold replaced the default 0.9
    assert v["greedy_token_agreement"] >= v["min_greedy_agreement"]
    assert v["decoder_logits_max_abs_diff"] < v["relative_tolerance"] * 10  # relative to max(1, |logit|)


def test_fp32_agreement_cannot_be_lowered(tmp_path):
    result = CliRunner().invoke(main, ["export", "--checkpoint_dir", str(tmp_path / "ck"), "--output",
                                       str(tmp_path / "fp32"), "--min_agreement", "0.5"])
    assert result.exit_code == 1
    assert "cannot be lowered for fp32" in result.output
    assert not (tmp_path / "fp32").exists()

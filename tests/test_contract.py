"""The graph contract: example inputs, checks of loaded graphs and manifests against it, the
per-slot decoder state, and the pull-style generator."""
import json
import shutil

import numpy as np
import onnx
import pytest

from v2t_engine.config import ModelConfig
from v2t_engine.errors import ArtifactError
from v2t_engine.runtime.backends import load_backend
from v2t_engine.runtime.backends.ort import OrtBackend
from v2t_engine.runtime.contract import (ATTENTION_MASK, INPUT_IDS, POSITION_IDS, DecoderInputs,
                                         decoder_contract, decoder_sizes, encoder_contract)
from v2t_engine.runtime.generator import CaptionGenerator, stream_captions
from v2t_engine.runtime.search import SearchOptions
from v2t_engine.runtime.state import SlotState

CFG = ModelConfig(vocab_size=50, frame_num=2, img_size=32, text_len=8, n_layer=2, n_head=2, n_embd=16,
                  vit_width=16, vit_layers=1, vit_heads=2, vit_patch_size=16)


def test_examples_follow_the_contract():
    contract = decoder_contract(CFG)
    sizes = decoder_sizes(batch=2, new_tokens=4, prefix_len=3, past_len=5)
    ex = contract.example(sizes, vocab_size=CFG.vocab_size)
    assert list(ex) == contract.input_names
    assert ex[INPUT_IDS].shape == (2, 4) and ex[INPUT_IDS].max() < CFG.vocab_size
    assert ex[POSITION_IDS].tolist() == [list(range(5, 12))] * 2  # after the past: 3 frames, 4 tokens
    assert ex[ATTENTION_MASK].shape == (2, 12) and (ex[ATTENTION_MASK] == 1).all()
    past = [ex[n] for n in contract.input_names[-contract.cache_inputs:]]
    assert contract.cache_inputs == 4 and all(p.shape == (2, 2, 5, 8) and p.dtype == np.float32 for p in past)
    assert encoder_contract(CFG).example({"num_frames": 3})["frames"].shape == (3, 3, 32, 32)


def test_graph_declarations_are_checked_tensor_by_tensor():
    contract = encoder_contract(CFG)
    good = [("frames", "float32", ["n", 3, 32, 32])]
    out = [("frame_embeds", "float32", ["n", 16])]
    contract.check(good, out, "g.onnx")  # symbolic names may differ
    cases = [
        ([("frames", "float16", ["n", 3, 32, 32])], out, "'frames' is float16"),
        ([("frames", "float32", ["n", 3, 64, 64])], out, "'frames' axis 2 is fixed to 64"),
        ([("frames", "float32", [4, 3, 32, 32])], out, "dynamic axis 'num_frames'"),
        ([("pixels", "float32", ["n", 3, 32, 32])], out, "no input 'frames'"),
        (good, [*out, ("extra", "float32", [1])], "does not know: extra"),
    ]
    for inputs, outputs, message in cases:
        with pytest.raises(ArtifactError, match=message):
            contract.check(inputs, outputs, "g.onnx")


def test_a_graph_that_breaks_the_contract_is_refused_on_load(random_export, tmp_path):
    broken = tmp_path / "export"
    shutil.copytree(random_export, broken)
    proto = onnx.load(str(broken / "decoder.onnx"))
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]  # input_ids (batch, new_tokens)
    batch.ClearField("dim_param")
    batch.dim_value = 3  # a graph exported for one batch size
    onnx.save(proto, str(broken / "decoder.onnx"))
    with pytest.raises(ArtifactError, match="decoder.onnx is .* bytes, the manifest says"):
        OrtBackend(broken)  # the manifest's file sizes catch it first
    manifest = json.loads((broken / "manifest.json").read_text(encoding="utf-8"))
    del manifest["files"]  # without them, the session's own check against the contract
    (broken / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ArtifactError, match="'input_ids' axis 0 is fixed to 3, the contract says the dynamic axis 'batch'"):
        OrtBackend(broken)
    (broken / "frame_encoder.onnx").write_bytes(b"not a graph")
    with pytest.raises(ArtifactError, match="frame_encoder.onnx: ONNX Runtime cannot load this graph"):
        OrtBackend(broken)


def test_a_manifest_from_another_contract_is_refused(random_export, tmp_path):
    old = tmp_path / "export"
    shutil.copytree(random_export, old)
    manifest = json.loads((old / "manifest.json").read_text(encoding="utf-8"))
    manifest["graphs"]["decoder"]["inputs"][0]["name"] = "tokens"
    (old / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ArtifactError, match="decoder graph's declared inputs and outputs differ"):
        load_backend(old)


def test_backends_are_chosen_by_directory_and_named_by_entry_point(random_export, random_checkpoint, tmp_path):
    assert load_backend(random_export).name == "ort"
    assert load_backend(random_checkpoint).name == "torch"
    with pytest.raises(ArtifactError, match="loads an export directory"):
        load_backend(random_checkpoint, backend="ort")
    with pytest.raises(ArtifactError, match="is none of"):
        load_backend(tmp_path)


def test_host_slot_decoder_steps_each_row_at_its_own_position_and_only_up_to_the_last_live_row(random_export):
    from v2t_engine.runtime.slot_decoder import HostSlotDecoder

    class Recording:  # the real backend, with each decoder call's inputs kept
        def __init__(self, backend):
            self.backend, self.config, self.calls = backend, backend.config, []

        def decoder_step(self, inputs, past, present):
            self.calls.append((inputs, past[0].shape))
            return self.backend.decoder_step(inputs, past, present)

    backend = Recording(OrtBackend(random_export))
    cfg = backend.config
    dec = HostSlotDecoder(backend, slots=4, frame_num=2, max_new_tokens=4)
    prefix = np.random.default_rng(0).standard_normal((2, 2, cfg.n_embd)).astype(np.float32)
    dec.prefill(np.array([0, 2]), prefix, np.array([0, 1]))  # two videos' 2 frames fill columns 0..1
    assert dec.start.tolist() == [0, 2, 0, 2]
    state = SlotState(slots=4, max_new_tokens=4, pad_id=0)
    state.begin(np.array([0, 2]))
    assert state.free.tolist() == [1, 3]
    ended = state.record(np.array([0, 2]), np.array([7, 0]))  # row 2 chose [PAD]: its caption ends
    assert ended.tolist() == [2] and state.live.tolist() == [True, False, False, False]
    dec.step(state.last_tokens(), state.live)
    inputs, past_shape = backend.calls[-1]
    assert isinstance(inputs, DecoderInputs) and past_shape[0] == 1  # rows after the last live one idle
    assert inputs.input_ids.tolist() == [[7]] and inputs.position_ids.tolist() == [[2]]
    assert inputs.attention_mask.tolist() == [[1, 1, 1]]
    state.begin(np.array([1]))  # a new video in the lowest free slot: rows 0..1 run
    dec.prefill(np.array([1]), prefix[:1], np.array([0]))
    assert dec.start[1] == 1  # its frames are the cache's last 2 columns
    state.record(np.array([0, 1]), np.array([5, 6]))
    dec.step(state.last_tokens(), state.live)
    inputs, past_shape = backend.calls[-1]
    assert past_shape[0] == 2 and inputs.position_ids.tolist() == [[3], [2]]
    assert inputs.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]


def test_the_pull_style_generator_takes_videos_while_it_runs(random_export, synth_data):
    from v2t_engine.inputs.frames import FrameSource, row_frames_or_error
    from v2t_engine.inputs.preprocess import normalize
    from v2t_engine.inputs.tables import InputSchema, read_table

    backend = OrtBackend(random_export)
    cfg = backend.config
    rows = list(read_table(synth_data["test"], InputSchema.parse("idx:str:1,imgbase64:str:1")))[:6]
    videos = [(r.idx, normalize(row_frames_or_error(r, "imgbase64", cfg.frame_num, cfg.img_size,
                                                    FrameSource())[0])) for r in rows]
    want = dict(stream_captions(backend, videos, SearchOptions(), cfg.text_len, slots=4))

    gen = CaptionGenerator(backend, SearchOptions(), cfg.text_len, slots=4)
    assert gen.is_done() and gen.videos_wanted() == 4
    gen.add(videos[:1])  # one request, then others arrive while it decodes
    got, pending, steps = {}, videos[1:], 0
    while not gen.is_done() or pending:
        if pending and gen.videos_wanted():
            gen.add([pending.pop(0)])
        got.update(gen.generate_next_token())
        steps += 1
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="slots"):
        gen.add(videos[:5])


def test_export_files_are_checked_against_the_manifest(random_export, tmp_path):
    manifest = json.loads((random_export / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["files"]) == {"frame_encoder.onnx", "decoder.onnx", "tokenizer.json"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["files"].values())

    truncated = tmp_path / "truncated"
    shutil.copytree(random_export, truncated)
    graph = truncated / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"decoder.onnx is \d+ bytes, the manifest says \d+"):
        load_backend(truncated)

    edited = tmp_path / "edited"
    shutil.copytree(random_export, edited)
    data = bytearray((edited / "tokenizer.json").read_bytes())
    data[-3] ^= 1  # same size, other content
    (edited / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="tokenizer.json does not have the SHA-256"):
        load_backend(edited, verify=True)


def test_uint8_crops_are_normalized_by_every_backend_exactly_as_preprocess_does(random_export, random_checkpoint,
                                                                                test_pixels):
    from v2t_engine.inputs.preprocess import normalize

    crops = np.random.default_rng(3).integers(0, 256, (3, *test_pixels.shape[2:]), dtype=np.uint8)
    for path in (random_export, random_checkpoint):
        backend = load_backend(path)
        assert np.array_equal(backend.encode_frames(crops), backend.encode_frames(normalize(crops)))

"""The graph contract: example inputs, checks of loaded graphs and manifests against it, the
fixed-length slot cache, and the pull-style generator."""
import json
import shutil

import numpy as np
import onnx
import pytest

from v2t_engine.config import ModelConfig
from v2t_engine.errors import ArtifactError
from v2t_engine.runtime.backends import load_backend
from v2t_engine.runtime.backends.ort import OrtBackend
from v2t_engine.runtime.contract import (BATCH, CACHE_LEN, INPUT_IDS, POSITION_IDS, decode_contract,
                                         encoder_contract)
from v2t_engine.runtime.generator import CaptionGenerator, stream_captions
from v2t_engine.runtime.search import SearchOptions
from v2t_engine.runtime.state import SlotState

CFG = ModelConfig(vocab_size=50, frame_num=2, img_size=32, text_len=8, n_layer=2, n_head=2, n_embd=16,
                  vit_width=16, vit_layers=1, vit_heads=2, vit_patch_size=16)


def test_examples_follow_the_contract():
    contract = decode_contract(CFG)
    ex = contract.example({BATCH: 2, CACHE_LEN: 5}, vocab_size=CFG.vocab_size)
    assert list(ex) == contract.input_names
    assert ex[INPUT_IDS].shape == (2, 1) and ex[INPUT_IDS].max() < CFG.vocab_size
    assert ex[POSITION_IDS].shape == (2, 1) and 0 <= ex[POSITION_IDS].min() and ex[POSITION_IDS].max() < 5
    cache = [ex[n] for n in contract.input_names[-contract.cache_inputs:]]
    assert contract.cache_inputs == 4 and all(c.shape == (2, 2, 5, 8) and c.dtype == np.float32 for c in cache)
    frames = encoder_contract(CFG).example({"num_frames": 3})["frames"]
    assert frames.shape == (3, 3, 32, 32) and frames.dtype == np.uint8


def test_graph_declarations_are_checked_tensor_by_tensor():
    contract = encoder_contract(CFG)
    good = [("frames", "uint8", ["n", 3, 32, 32])]
    out = [("frame_embeds", "float32", ["n", 16])]
    contract.check(good, out, "g.onnx")  # symbolic names may differ
    cases = [
        ([("frames", "float32", ["n", 3, 32, 32])], out, "'frames' is float32"),
        ([("frames", "uint8", ["n", 3, 64, 64])], out, "'frames' axis 2 is fixed to 64"),
        ([("frames", "uint8", [4, 3, 32, 32])], out, "dynamic axis 'num_frames'"),
        ([("pixels", "uint8", ["n", 3, 32, 32])], out, "no input 'frames'"),
        (good, [*out, ("extra", "float32", [1])], "does not know: extra"),
    ]
    for inputs, outputs, message in cases:
        with pytest.raises(ArtifactError, match=message):
            contract.check(inputs, outputs, "g.onnx")


def test_a_graph_that_breaks_the_contract_is_refused_on_load(random_export, tmp_path):
    broken = tmp_path / "export"
    shutil.copytree(random_export, broken)
    proto = onnx.load(str(broken / "decode.onnx"))
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]  # input_ids (batch, 1)
    batch.ClearField("dim_param")
    batch.dim_value = 3  # a graph exported for one batch size
    onnx.save(proto, str(broken / "decode.onnx"))
    with pytest.raises(ArtifactError, match="decode.onnx is .* bytes, the manifest says"):
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
    manifest["graphs"]["decode"]["inputs"][0]["name"] = "tokens"
    (old / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ArtifactError, match="decode graph's declared inputs and outputs differ"):
        load_backend(old)
    manifest["format_version"] = 1  # an export of the format before prefill/decode
    (old / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ArtifactError, match="unsupported format 'v2t-onnx' version 1; re-export"):
        load_backend(old)


def test_backends_are_chosen_by_directory_and_named_by_entry_point(random_export, random_checkpoint, tmp_path):
    assert load_backend(random_export).name == "ort"
    assert load_backend(random_checkpoint).name == "torch"
    with pytest.raises(ArtifactError, match="loads an export directory"):
        load_backend(random_checkpoint, backend="ort")
    with pytest.raises(ArtifactError, match="is none of"):
        load_backend(tmp_path)


def test_bound_slot_decoder_steps_each_row_at_its_own_position_and_only_up_to_the_last_live_row(random_export):
    from v2t_engine.runtime.slot_decoder import BoundSlotDecoder

    class Recording:  # the real backend, with each decode call's inputs kept
        def __init__(self, backend):
            self.backend, self.config, self.xp, self.calls = backend, backend.config, backend.xp, []

        def prefill(self, *args):
            self.backend.prefill(*args)

        def decode(self, input_ids, position_ids, cache, logits, kv_out):
            self.calls.append((input_ids.copy(), position_ids.copy(), cache[0].shape))
            self.backend.decode(input_ids, position_ids, cache, logits, kv_out)

    backend = Recording(OrtBackend(random_export))
    cfg = backend.config
    dec = BoundSlotDecoder(backend, slots=4, frame_num=2, max_new_tokens=4)
    assert dec.kv.shape == (2 * cfg.n_layer, 4, cfg.n_head, 6, cfg.head_dim)  # frames + caption tokens: fixed
    prefix = np.random.default_rng(0).standard_normal((2, 2, cfg.n_embd)).astype(np.float32)
    dec.prefill(np.array([0, 2]), prefix, np.array([0, 1]))  # two videos' 2 frames fill columns 0..1
    assert dec.pos.tolist() == [2, 0, 2, 0]
    state = SlotState(slots=4, max_new_tokens=4, pad_id=0)
    state.begin(np.array([0, 2]))
    assert state.free.tolist() == [1, 3]
    ended = state.record(np.array([0, 2]), np.array([7, 0]))  # row 2 chose [PAD]: its caption ends
    assert ended.tolist() == [2] and state.live.tolist() == [True, False, False, False]
    before = dec.kv.copy()
    dec.step(state.last_tokens(), state.live)
    ids, pos, cache_shape = backend.calls[-1]
    assert cache_shape[0] == 1  # rows after the last live one idle
    assert ids.tolist() == [[7]] and pos.tolist() == [[2]] and dec.pos.tolist() == [3, 0, 2, 0]
    for old, new in zip(before, dec.kv):  # only row 0's column 2 was written, in place
        changed = np.argwhere((old != new).any(axis=(1, 3)))
        assert changed.tolist() == [[0, 2]]
    state.begin(np.array([1]))  # a new video in the lowest free slot: rows 0..1 run
    dec.prefill(np.array([1]), prefix[:1], np.array([0]))
    state.record(np.array([0, 1]), np.array([5, 6]))
    dec.step(state.last_tokens(), state.live)
    ids, pos, cache_shape = backend.calls[-1]
    assert cache_shape[0] == 2 and ids.tolist() == [[5], [6]] and pos.tolist() == [[3], [2]]


def test_the_decode_graph_never_reads_a_column_at_or_past_a_rows_position(random_export):
    """Whatever an earlier video left in a slot's later columns changes nothing."""
    backend = OrtBackend(random_export)
    cfg = backend.config
    rng = np.random.default_rng(1)
    n, L = 3, 10
    cache = [rng.standard_normal((n, cfg.n_head, L, cfg.head_dim)).astype(np.float32) for _ in range(2 * cfg.n_layer)]
    ids, pos = rng.integers(0, cfg.vocab_size, (n, 1)), np.array([[0], [4], [9]])
    outs = []
    for noise in (0.0, 1e3):
        noisy = [c.copy() for c in cache]
        for c in noisy:
            for r, p in enumerate(pos[:, 0]):
                c[r, :, p:] += noise
        logits = np.empty((n, cfg.vocab_size), np.float32)
        kv = [np.empty((n, cfg.n_head, 1, cfg.head_dim), np.float32) for _ in cache]
        backend.decode(ids, pos, noisy, logits, kv)
        outs.append((logits, kv))
    assert np.array_equal(outs[0][0], outs[1][0])
    assert all(np.array_equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_the_pull_style_generator_takes_videos_while_it_runs(random_export, synth_data):
    from v2t_engine.inputs.frames import FrameSource, row_frames_or_error
    from v2t_engine.inputs.tables import InputSchema, read_table

    backend = OrtBackend(random_export)
    cfg = backend.config
    rows = list(read_table(synth_data["test"], InputSchema.parse("idx:str:1,imgbase64:str:1")))[:6]
    videos = [(r.idx, row_frames_or_error(r, "imgbase64", cfg.frame_num, cfg.img_size, FrameSource())[0])
              for r in rows]
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
    assert set(manifest["files"]) == {"frame_encoder.onnx", "prefill.onnx", "decode.onnx", "tokenizer.json"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["files"].values())

    truncated = tmp_path / "truncated"
    shutil.copytree(random_export, truncated)
    graph = truncated / "decode.onnx"
    graph.write_bytes(graph.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"decode.onnx is \d+ bytes, the manifest says \d+"):
        load_backend(truncated)

    edited = tmp_path / "edited"
    shutil.copytree(random_export, edited)
    data = bytearray((edited / "tokenizer.json").read_bytes())
    data[-3] ^= 1  # same size, other content
    (edited / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="tokenizer.json does not have the SHA-256"):
        load_backend(edited, verify=True)


def test_the_encoder_graph_normalizes_uint8_crops_exactly_as_preprocess_does(random_export, random_checkpoint):
    """The graph's lookup gives preprocess.normalize's floats bit for bit, so its embeddings are the
    PyTorch model's on normalize(crops) to fp32 rounding; float input is refused, not guessed at."""
    import torch

    from v2t_engine.inputs.preprocess import normalize
    from v2t_training.checkpoint import load_model

    model, _ = load_model(random_checkpoint)
    size = model.cfg.img_size
    crops = np.random.default_rng(3).integers(0, 256, (3, 3, size, size), dtype=np.uint8)
    with torch.no_grad():
        want = model.first_stage_model(torch.from_numpy(normalize(crops))).numpy()
    for path in (random_export, random_checkpoint):
        backend = load_backend(path)
        np.testing.assert_allclose(backend.encode_frames(crops), want, rtol=0, atol=1e-5)
        with pytest.raises(TypeError, match="uint8"):
            backend.encode_frames(normalize(crops))

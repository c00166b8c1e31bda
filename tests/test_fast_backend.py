"""The torch-fast backend (issue #10): a static KV cache on the device, steps over the live rows
only (CUDA graphs on a GPU), bf16/fp16 on CUDA, uint8 crops normalized on the device.

On the CPU it runs fp32, and through the real generator it must give the reference backend's tokens
exactly: greedy with slots refilled mid-run, beam search, sampling with a seed. The tests marked
gpu check on CUDA that bf16/fp16 captions agree with the fp32 reference and that replaying CUDA
graphs gives the eager steps' tokens."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from v2t_engine.errors import ConfigError  # noqa: E402
from v2t_engine.inputs.frames import FrameSource, row_frames_or_error  # noqa: E402
from v2t_engine.inputs.preprocess import normalize  # noqa: E402
from v2t_engine.inputs.tables import InputSchema, read_table  # noqa: E402
from v2t_engine.runtime.backends import load_backend  # noqa: E402
from v2t_engine.runtime.captioner import Captioner  # noqa: E402
from v2t_engine.runtime.generator import CaptionGenerator, make_slot_decoder, stream_captions  # noqa: E402
from v2t_engine.runtime.search import SearchOptions  # noqa: E402
from v2t_engine.runtime.slot_decoder import BoundSlotDecoder, active_rows, bucket  # noqa: E402
from v2t_training.fast_backend import FastTorchBackend, RegionallyCompiledViT, StaticSlotDecoder  # noqa: E402
from v2t_training.torch_backend import TorchBackend  # noqa: E402

from conftest import TEST_SCHEMA  # noqa: E402

N_VIDEOS = 24
GREEDY = SearchOptions()
SAMPLED = SearchOptions(do_sample=True, top_k=20, temperature=1.5, num_return=2)
BEAM3 = SearchOptions(num_beams=3, num_return=2)
NO_CUDA = "--device cuda: no CUDA device is visible to PyTorch (torch.cuda.is_available() is False); use --device cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def read_crops(table, frame_num, img_size):
    """(N, F, 3, S, S) uint8 crops of a test table's clips, decoded as predict decodes them."""
    rows = read_table(table, InputSchema.parse(TEST_SCHEMA))
    return np.stack([row_frames_or_error(r, "imgbase64", frame_num, img_size, FrameSource())[0] for r in rows])


@pytest.fixture(scope="module")
def reference(random_checkpoint):
    return TorchBackend(random_checkpoint)


@pytest.fixture(scope="module")
def fast(random_checkpoint):
    return FastTorchBackend(random_checkpoint)


@pytest.fixture(scope="module")
def crops(synth_data, reference):
    cfg = reference.config
    return read_crops(synth_data["test"], cfg.frame_num, cfg.img_size)[:N_VIDEOS]


@pytest.fixture(scope="module")
def pixels(test_pixels):
    return test_pixels[:N_VIDEOS]


def caption_ids(backend, videos, opts=GREEDY, slots=4, seed=None):
    """Token ids (N, num_return, T) of every video through the real generator (`slots` rows)."""
    got = dict(stream_captions(backend, enumerate(videos), opts, backend.config.text_len, slots, seed))
    return np.stack([got[i] for i in range(len(videos))])


# ------------------------------------------------------------------------------- CPU, fp32
def test_uint8_crops_give_the_embeddings_of_normalized_frames_exactly(fast, reference, crops, pixels):
    assert np.array_equal(crops, pixels)
    frames = crops[:6].reshape(-1, *crops.shape[2:])  # (N, 3, S, S)
    assert np.array_equal(fast.device_frames(frames).cpu().numpy(), normalize(frames))
    from_crops = fast.encode_frames(frames)
    assert from_crops.dtype == np.float32 and from_crops.shape == (len(frames), fast.config.n_embd)
    assert np.array_equal(from_crops, fast.encode_frames(normalize(frames)))
    assert np.array_equal(from_crops, reference.encode_frames(frames))


def test_the_generator_runs_the_static_slot_decoder(fast, reference):
    assert isinstance(make_slot_decoder(fast, 4, 4, 16), StaticSlotDecoder)
    assert isinstance(make_slot_decoder(reference, 4, 4, 16), BoundSlotDecoder)


@pytest.mark.parametrize("slots", [3, 8, N_VIDEOS])
def test_greedy_tokens_equal_the_reference(fast, reference, crops, pixels, slots):
    expected = caption_ids(reference, pixels, slots=slots)
    # Captions of different lengths: with fewer slots than videos, slots are refilled while other
    # captions still run, and a live row may sit above dead ones.
    assert len(set((expected[:, 0] != fast.config.pad_id).sum(axis=1).tolist())) > 1
    assert np.array_equal(caption_ids(fast, crops, slots=slots), expected)


def test_encoding_ahead_on_threads_gives_the_reference_tokens(random_checkpoint, reference, crops, pixels):
    """What CUDA runs (generator.EncodeAhead): encode_frames on two threads at once, ahead of the
    decoder; here on the CPU's eager ViT."""
    ahead = FastTorchBackend(random_checkpoint)
    ahead.encodes_ahead = True
    assert np.array_equal(caption_ids(ahead, crops, slots=3), caption_ids(reference, pixels, slots=3))


def test_beam_search_equals_the_reference(fast, reference, crops, pixels):
    # 7 rows: two videos' beams at a time, one row idle, beams reordered in place each step.
    expected = caption_ids(reference, pixels[:10], BEAM3, slots=7)
    assert np.array_equal(caption_ids(fast, crops[:10], BEAM3, slots=7), expected)


def test_sampling_with_a_seed_equals_the_reference(fast, reference, crops, pixels):
    expected = caption_ids(reference, pixels[:12], SAMPLED, slots=5, seed=3)
    assert np.array_equal(caption_ids(fast, crops[:12], SAMPLED, slots=5, seed=3), expected)


def test_mixed_searches_in_one_batch_equal_the_reference(fast, reference, crops, pixels):
    """Greedy, sampled and beam videos share the steps, as in a service."""
    kinds = [GREEDY, SearchOptions(do_sample=True, top_k=5, num_return=2, seed=9), BEAM3]

    def run(backend, videos):
        gen = CaptionGenerator(backend, GREEDY, backend.config.text_len, slots=6)
        pending = [(i, v, kinds[i % 3]) for i, v in enumerate(videos)]
        got = {}
        while pending or not gen.is_done():
            while pending and gen.free_slots() >= gen.slots_needed(pending[0][2]):
                gen.add([pending.pop(0)])
            got.update(gen.generate_next_token())
        return [got[i] for i in range(len(videos))]

    for a, b in zip(run(fast, crops[:9]), run(reference, pixels[:9]), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("warm_up", [False, True], ids=["plain", "warm-up-every-step"])
def test_static_decoder_follows_the_host_decoder_call_for_call(fast, reference, pixels, warm_up):
    """Prefill, steps with dead rows below live ones, an in-place swap of two rows' captions, a
    refill while others run and a copy between rows of different lengths: the same logits (to fp32 rounding) and the same argmax. With
    `warm_up`, the runs made before a CUDA graph capture precede every step (on the CPU, eagerly)
    and must change nothing."""
    cfg = fast.config
    prefix = fast.encode_frames(pixels[:3].reshape(-1, *pixels.shape[2:])).reshape(3, cfg.frame_num, -1)
    static = fast.slot_decoder(8, cfg.frame_num, cfg.text_len)
    host = BoundSlotDecoder(reference, 8, cfg.frame_num, cfg.text_len)
    if warm_up:
        step = static.step

        def warmed_step(tokens, live):
            with torch.inference_mode():  # as inside step()
                static._warm_up(bucket(active_rows(live), static.slots))
            step(tokens, live)

        static.step = warmed_step

    def both(method, *args):
        for decoder in (static, host):
            getattr(decoder, method)(*args)

    def check(rows):
        np.testing.assert_allclose(static.logits(rows), host.logits(rows), rtol=1e-4, atol=1e-4)
        assert np.array_equal(static.argmax(rows), host.argmax(rows))

    live = np.zeros(8, bool)
    rows = np.array([0, 1, 2, 5])
    both("prefill", rows, prefix, np.array([0, 1, 2, 2]))
    live[rows] = True
    check(rows)
    tokens = np.full(8, 7, np.int64)  # what dead rows are fed must not matter
    for t in range(6):
        tokens[live] = host.argmax(np.flatnonzero(live))
        both("step", tokens, live)
        check(np.flatnonzero(live))
        if t == 1:  # row 1 ends; rows 0 and 2 swap captions (each reads the other before writing)
            live[1] = False
            both("copy_rows", np.array([0, 2]), np.array([2, 0]))
        if t == 3:  # a new video in the freed row while the others run on
            both("prefill", np.array([1]), prefix[1:2], np.array([0]))
            live[1] = True
            check(np.array([1]))
        if t == 4:  # a longer caption's row takes over the new row's shorter one
            both("copy_rows", np.array([5]), np.array([1]))


def test_buckets_are_powers_of_two_up_to_the_slots():
    assert [bucket(a, 8) for a in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [bucket(a, 12) for a in (5, 8, 9, 12)] == [8, 8, 12, 12]


def test_captioner_loads_torch_fast_by_name(random_checkpoint, reference, crops, pixels):
    cap = Captioner.load(random_checkpoint, backend="torch-fast")
    assert isinstance(cap.backend, FastTorchBackend) and cap.backend.name == "torch-fast"
    assert cap.caption_pixels(crops[:6]) == Captioner(reference).caption_pixels(pixels[:6])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_one_config_error(random_checkpoint):
    with pytest.raises(ConfigError) as err:
        FastTorchBackend(random_checkpoint, device="cuda")
    assert str(err.value) == NO_CUDA
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        load_backend(random_checkpoint, "torch-fast", device="cuda")


@pytest.mark.parametrize("precision", ["bf16", "fp16", "int8"])
def test_the_cpu_runs_fp32_only(random_checkpoint, precision):
    with pytest.raises(ConfigError, match=f"--precision {precision}"):
        FastTorchBackend(random_checkpoint, precision=precision)


def test_fp32_may_be_asked_for_on_the_cpu(random_checkpoint):
    backend = FastTorchBackend(random_checkpoint, precision="fp32")
    assert backend.dtype == torch.float32 and not backend.cuda_graphs


def test_torch_compile_mode_is_checked(monkeypatch):
    from v2t_training.fast_backend import compiled_vit

    monkeypatch.setenv("V2T_TORCH_COMPILE", "0")
    assert compiled_vit(torch.nn.Identity()) is None
    monkeypatch.setenv("V2T_TORCH_COMPILE", "fast")
    with pytest.raises(ConfigError, match="V2T_TORCH_COMPILE=fast: want one of blocks, graph, 0"):
        compiled_vit(torch.nn.Identity())


@pytest.mark.slow  # inductor compiles C++ on the CPU: ~10 s
def test_the_regionally_compiled_vit_compiles_one_block_for_all_and_gives_the_eager_embeddings():
    from torch._dynamo.utils import counters

    from v2t_engine.config import ModelConfig
    from v2t_training.model import VideoCaptioner

    cfg = ModelConfig(vocab_size=10, n_embd=16, n_head=2, n_layer=1, frame_num=2, text_len=4, img_size=32,
                      vit_width=32, vit_layers=4, vit_heads=4, vit_patch_size=8)
    torch.manual_seed(0)
    vit = VideoCaptioner(cfg).first_stage_model.eval()
    torch._dynamo.reset()
    counters.clear()
    frames = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(RegionallyCompiledViT(vit)(frames), vit(frames), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2  # three blocks share one graph; the last has its own


# ------------------------------------------------------------------------------- CUDA
@pytest.fixture(scope="module")
def many_crops(reference, tmp_path_factory):
    """200 held-out clips: at 98 % agreement, 24 would allow no disagreement at all."""
    from v2t_engine.jobs.synth import write_dataset

    cfg = reference.config
    table = write_dataset(tmp_path_factory.mktemp("many"), n_train=0, n_val=0, n_test=200, seed=2)["test"]
    return read_crops(table, cfg.frame_num, cfg.img_size)


def captions(backend, videos, slots=64):
    return [backend.tokenizer.decode(ids[0].tolist()) for ids in caption_ids(backend, videos, slots=slots)]


def agreement(checkpoint, crops, precision):
    """Share of videos whose greedy caption on CUDA in `precision` equals the fp32 reference's."""
    expected = captions(TorchBackend(checkpoint), crops)
    got = captions(FastTorchBackend(checkpoint, device="cuda", precision=precision), crops)
    return float(np.mean([a == b for a, b in zip(got, expected, strict=True)]))


@pytest.mark.gpu
@needs_cuda
# The random model's logits are near ties (11.5 % of its videos have a greedy step whose top two
# differ by under 0.005), which bf16's 8-bit mantissa cannot resolve: simulated on the CPU, bf16
# weights alone keep 95-96.5 % of its captions, fp16 99 %, while a trained model keeps 99.5 % in
# bf16. So the 98 % target is checked on the trained model (below); here bf16 gets a looser bar.
@pytest.mark.parametrize("precision, bar", [("fp32", 0.98), ("bf16", 0.90), ("fp16", 0.98)])
def test_cuda_captions_agree_with_the_fp32_reference(random_checkpoint, many_crops, precision, bar):
    share = agreement(random_checkpoint, many_crops, precision)
    print(f"random checkpoint, {precision}: {share:.1%} of {len(many_crops)} captions equal fp32")
    assert share >= bar


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_captions_of_the_trained_model_agree_on_its_heldout_table(precision, tmp_path_factory):
    """With V2T_TRAINED_CHECKPOINT set to a checkpoint of the README recipe (the demo's, say): its
    held-out clips, from V2T_TRAINED_TABLE (the demo's test.txt) or else 100 fresh ones."""
    checkpoint = os.environ.get("V2T_TRAINED_CHECKPOINT")
    if not checkpoint:
        pytest.skip("V2T_TRAINED_CHECKPOINT is not set")
    from v2t_engine.jobs.synth import write_dataset

    cfg = TorchBackend(checkpoint).config
    table = os.environ.get("V2T_TRAINED_TABLE") or write_dataset(
        tmp_path_factory.mktemp("heldout"), n_train=0, n_val=0, n_test=100, seed=1)["test"]
    crops = read_crops(table, cfg.frame_num, cfg.img_size)
    share = agreement(checkpoint, crops, precision)
    print(f"trained checkpoint, {precision}: {share:.1%} of {len(crops)} held-out captions equal fp32")
    assert share >= 0.98


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("opts", [GREEDY, BEAM3], ids=["greedy", "beams"])
def test_cuda_graph_replay_gives_the_eager_tokens(random_checkpoint, many_crops, opts):
    backend = FastTorchBackend(random_checkpoint, device="cuda")
    assert backend.cuda_graphs
    videos = many_crops[:40]
    replayed = caption_ids(backend, videos, opts, slots=12)  # buckets 1, 2, 4, 8 and 12
    backend.cuda_graphs = False
    assert np.array_equal(caption_ids(backend, videos, opts, slots=12), replayed)


@pytest.mark.gpu
@needs_cuda
def test_the_compiled_encoder_gives_the_eager_embeddings(random_checkpoint, many_crops):
    """300 frames run as one compiled chunk of 256 and 44 eager ones, 20 wholly eagerly: every
    embedding equals the eager ViT's up to fp32 reordering."""
    from v2t_training.fast_backend import ENCODER_CHUNK

    backend = FastTorchBackend(random_checkpoint, device="cuda", precision="fp32")
    frames = np.concatenate([many_crops.reshape(-1, *many_crops.shape[2:])] * 4)[:300]
    assert ENCODER_CHUNK < len(frames) < 2 * ENCODER_CHUNK
    with torch.inference_mode():
        eager = backend.model.first_stage_model(backend.device_frames(frames)).cpu().numpy()
    np.testing.assert_allclose(backend.encode_frames(frames), eager, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(backend.encode_frames(frames[:20]), eager[:20], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_cuda_normalizes_uint8_exactly(random_checkpoint, many_crops):
    backend = FastTorchBackend(random_checkpoint, device="cuda")
    frames = many_crops[:8].reshape(-1, *many_crops.shape[2:])
    assert np.array_equal(backend.device_frames(frames).cpu().numpy(), normalize(frames))

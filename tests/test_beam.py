"""Per-video search options and beam search in the continuous batch, on the random-weight export:
a video's captions depend on its own options only, never on what else runs in the batch; beams
of width 1 are greedy; ONNX Runtime and the PyTorch reference agree. (Beam search against an
exhaustive search on injected logits: tests/test_search.py.)"""
import numpy as np
import pytest

from v2t_engine.inputs.preprocess import normalize
from v2t_engine.runtime.backends.ort import OrtBackend
from v2t_engine.runtime.generator import CaptionGenerator, stream_captions
from v2t_engine.runtime.search import SearchOptions

from conftest import TEST_SCHEMA

N_VIDEOS = 10
GREEDY = SearchOptions()
SAMPLED = SearchOptions(do_sample=True, top_k=20, temperature=1.5, num_return=2, seed=11)
BEAM3 = SearchOptions(num_beams=3, num_return=3)


@pytest.fixture(scope="module")
def backend(random_export):
    return OrtBackend(random_export)


@pytest.fixture(scope="module")
def pixels(test_pixels):
    """(N, F, 3, S, S) uint8 crops of the first held-out clips."""
    return test_pixels[:N_VIDEOS]


def run(gen, videos):
    """Feed (key, pixels[, opts]) as slots free up, like a service; → {key: ids}."""
    got, pending = {}, list(videos)
    while pending or not gen.is_done():
        while pending and gen.free_slots() >= gen.slots_needed(pending[0][2] if len(pending[0]) > 2 else None):
            gen.add([pending.pop(0)])
        got.update(gen.generate_next_token())
    return got


def alone(backend, video, opts):
    gen = CaptionGenerator(backend, GREEDY, backend.config.text_len, slots=opts.rows_per_video)
    return run(gen, [("v", video, opts)])["v"]


def test_a_video_with_its_own_seed_samples_the_same_whatever_else_runs(backend, pixels):
    want = alone(backend, pixels[0], SAMPLED)
    assert want.shape == (2, backend.config.text_len)
    for slots, generator_opts, gen_seed in ((3, GREEDY, None), (8, SearchOptions(do_sample=True), 5)):
        gen = CaptionGenerator(backend, generator_opts, backend.config.text_len, slots=slots, seed=gen_seed)
        others = [(f"o{i}", p) for i, p in enumerate(pixels[1:6])]
        got = run(gen, [*others[:3], ("x", pixels[0], SAMPLED), *others[3:]])
        assert np.array_equal(got["x"], want), slots
    # The seed is what keys the samples: another seed, other samples.
    other = alone(backend, pixels[0], SearchOptions(do_sample=True, top_k=20, temperature=1.5, num_return=2,
                                                   seed=12))
    assert not np.array_equal(other, want)


def test_videos_with_different_options_share_the_batch(backend, pixels):
    T = backend.config.text_len
    greedy = dict(stream_captions(backend, enumerate(pixels[:4]), GREEDY, T, slots=1))
    gen = CaptionGenerator(backend, SearchOptions(do_sample=True), T, slots=8, seed=0)
    videos = [(0, pixels[0], GREEDY), (1, pixels[1], SAMPLED), (2, pixels[2], BEAM3), (3, pixels[3]),
              (4, pixels[2], GREEDY)]
    got = run(gen, videos)
    assert np.array_equal(got[0], greedy[0]) and np.array_equal(got[4], greedy[2])
    assert got[1].shape == (2, T) and got[2].shape == (3, T) and got[3].shape == (1, T)
    assert np.array_equal(got[2], alone(backend, pixels[2], BEAM3))


def test_the_generator_options_keep_their_ordinal_streams(backend, pixels):
    """Videos added without options use the generator's seed and their order, as predict does."""
    T = backend.config.text_len
    opts = SearchOptions(do_sample=True, top_k=20, num_return=2)
    want = dict(stream_captions(backend, enumerate(pixels[:5]), opts, T, slots=4, seed=3))
    gen = CaptionGenerator(backend, opts, T, slots=6, seed=3)
    got = run(gen, list(enumerate(pixels[:5])))
    assert all(np.array_equal(got[i], want[i]) for i in range(5))


def test_a_video_needing_more_slots_than_the_generator_has_is_refused(backend, pixels):
    gen = CaptionGenerator(backend, GREEDY, backend.config.text_len, slots=2)
    with pytest.raises(ValueError, match="slots"):
        gen.add([("x", pixels[0], BEAM3)])
    assert gen.is_done() and gen.free_slots() == 2


# ----------------------------------------------------------------------------- beams in the batch
def captions_of(backend, pixels, opts, slots, others=()):
    """{key: ids} for videos 0..N-1 of `pixels` with `opts`, in one batch with `others`
    ((key, pixels, opts) added between them)."""
    gen = CaptionGenerator(backend, opts, backend.config.text_len, slots=slots)
    mine = [(i, p) for i, p in enumerate(pixels)]
    mixed = [v for pair in zip(mine, list(others) + [None] * len(mine)) for v in pair if v is not None]
    return run(gen, mixed)


def test_one_beam_equals_greedy(backend, pixels):
    T = backend.config.text_len
    greedy = dict(stream_captions(backend, enumerate(pixels), GREEDY, T, slots=4))
    one = dict(stream_captions(backend, enumerate(pixels), SearchOptions(num_beams=1), T, slots=4))
    assert all(np.array_equal(greedy[i], one[i]) for i in range(len(pixels)))


def test_beams_do_not_depend_on_the_batch(backend, pixels):
    want = {i: alone(backend, p, BEAM3) for i, p in enumerate(pixels[:4])}
    assert not all(np.array_equal(w[0], w[1]) for w in want.values())  # the beams differ
    others = [("g0", pixels[5], GREEDY), ("b1", pixels[6], SearchOptions(num_beams=2, num_return=2)),
              ("s2", pixels[7], SAMPLED), ("g3", pixels[8], GREEDY)]
    for slots in (1, 3, 8):
        for extra in ((), others):
            got = captions_of(backend, pixels[:4], BEAM3, slots, extra)
            assert all(np.array_equal(got[i], want[i]) for i in want), (slots, len(extra))
    # Other videos' captions are not disturbed by beams beside them either.
    mixed = captions_of(backend, pixels[:4], BEAM3, 8, others)
    assert np.array_equal(mixed["g0"], alone(backend, pixels[5], GREEDY))


def reference_beams(model, frames, opts, max_new, pad):
    """BeamSearch driven by the PyTorch model run on each beam's whole caption, no KV cache: what
    the generator's cache reorder must reproduce."""
    import torch

    from v2t_engine.runtime.search import BeamSearch

    K = opts.num_beams
    with torch.no_grad():
        prefix = model.encode_frames(torch.from_numpy(normalize(frames)[None])).expand(K, -1, -1)  # (K, F, E)
        beams = BeamSearch(opts, max_new, pad)
        tokens = torch.zeros(K, 0, dtype=torch.long)
        while True:
            logits, _ = model.transformer(tokens, prefix_embeds=prefix, last_only=True)  # (K, V)
            beams.step(logits.numpy())
            if beams.done:
                return beams.best(opts.num_return)
            tokens = torch.from_numpy(beams.tokens[:, :beams.length])


@pytest.mark.parametrize("opts", [BEAM3, SearchOptions(num_beams=4, num_return=2, length_penalty=0.0,
                                                       no_repeat_ngram_size=2)])
def test_beams_with_the_slot_cache_equal_beams_without_cache(random_checkpoint, backend, pixels, opts):
    pytest.importorskip("torch")
    from v2t_training.checkpoint import load_model
    from v2t_training.torch_backend import TorchBackend

    model, _ = load_model(random_checkpoint)
    model.eval()
    cfg = backend.config
    ort = captions_of(backend, pixels[:3], opts, slots=8)
    torch_backend = captions_of(TorchBackend(random_checkpoint), pixels[:3], opts, slots=8)
    for i in range(3):
        want = reference_beams(model, pixels[i], opts, cfg.text_len, cfg.pad_id)
        assert np.array_equal(ort[i], want), i
        assert np.array_equal(torch_backend[i], want), i


def test_predict_with_beams(random_export, synth_data, tmp_path, backend, pixels):
    import json

    from conftest import run_cli
    from v2t_engine.runtime.captioner import Captioner

    base = ["predict", "--tables", synth_data["test"], "--checkpoint_dir", random_export, "--input_schema",
            TEST_SCHEMA, "--first_sequence", "imgbase64"]
    run_cli([*base, "--outputs", tmp_path / "b.txt", "--num_beams", 3, "--micro_batch_size", 3,
             "--user_defined_parameters", "max_generated_num=2"])
    rows = [line.split("\t") for line in (tmp_path / "b.txt").read_text(encoding="utf-8").splitlines()]
    cap = Captioner(backend)
    want = cap.caption_pixels(pixels[:N_VIDEOS], SearchOptions(num_beams=3, num_return=2))
    assert [json.loads(r[1]) for r in rows[:N_VIDEOS]] == want
    for extra, message in ((["--num_beams", 2, "--do_sample"], "beam sampling"),
                           (["--num_beams", 2, "--user_defined_parameters", "max_generated_num=3"],
                            "max_generated_num=3 is more than num_beams=2")):
        result = run_cli([*base, "--outputs", tmp_path / "x.txt", *extra], expect_code=1)
        assert result.output.startswith("Error: ") and message in result.output


@pytest.mark.slow
def test_quality_benchmark_runs_quick(tmp_path):
    """bench_quality.py --quick trains, exports and scores a one-epoch model: the script works
    (its figures mean nothing here)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--datasets", "builtin", "--repeats", "1",
                             "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Caption quality by decoding method" in result.stdout and "| --- |" in result.stdout
    assert result.stdout.count("| builtin |") == 6 and "target: beam 3" in result.stdout

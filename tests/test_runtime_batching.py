"""Continuous batching and the slot KV cache: greedy captions equal one-at-a-time decoding and
the PyTorch reference; sampling is reproducible whatever the number of slots."""
import numpy as np
import pytest

from v2t_engine.runtime.backends.ort import OrtBackend
from v2t_engine.runtime.generator import generate_candidates, stream_captions
from v2t_engine.runtime.kv_cache import SlotCache
from v2t_engine.runtime.search import SearchOptions


N_VIDEOS = 24


@pytest.fixture(scope="module")
def backend(random_export):
    return OrtBackend(random_export)


@pytest.fixture(scope="module")
def pixels(test_pixels):
    """(N, F, 3, S, S) normalized frames of the first held-out clips."""
    return test_pixels[:N_VIDEOS]


def caption_all(backend, pixels, opts=SearchOptions(), slots=4, seed=None):
    cfg = backend.config
    got = dict(stream_captions(backend, enumerate(pixels), opts, cfg.text_len, slots, seed))
    return np.stack([got[i] for i in range(len(pixels))])  # (N, n, T)


def one_at_a_time(backend, pixels):
    rng = np.random.default_rng(0)
    return np.stack([generate_candidates(backend, p[None], SearchOptions(), rng, backend.config.text_len)[0]
                     for p in pixels])


def caption_lengths(tokens, pad_id):
    return (tokens[:, 0] != pad_id).sum(axis=1)


@pytest.mark.parametrize("slots", [3, 8])
def test_continuous_batching_gives_one_at_a_time_greedy_tokens(backend, pixels, slots):
    alone = one_at_a_time(backend, pixels)
    # Captions of different lengths: slots are refilled while other captions still run.
    assert len(set(caption_lengths(alone, backend.config.pad_id).tolist())) > 1
    assert np.array_equal(caption_all(backend, pixels, slots=slots), alone)


def test_ort_greedy_tokens_equal_pytorch_reference(random_checkpoint, backend, pixels):
    torch = pytest.importorskip("torch")
    from v2t_training.checkpoint import load_model

    model, _ = load_model(random_checkpoint)
    reference = model.eval().generate_greedy(torch.from_numpy(pixels)).numpy()
    assert np.array_equal(caption_all(backend, pixels, slots=5)[:, 0], reference)


def test_sampling_is_reproducible_and_independent_of_slots(backend, pixels):
    opts = SearchOptions(do_sample=True, top_k=20, temperature=1.5, num_return=2)
    first = caption_all(backend, pixels, opts, slots=4, seed=3)
    assert np.array_equal(first, caption_all(backend, pixels, opts, slots=4, seed=3))
    assert np.array_equal(first, caption_all(backend, pixels, opts, slots=11, seed=3))
    assert not np.array_equal(first, caption_all(backend, pixels, opts, slots=4, seed=4))


def test_generate_candidates_repeats_greedy_and_samples_each_candidate(backend, pixels):
    T = backend.config.text_len
    greedy = generate_candidates(backend, pixels[:3], SearchOptions(num_return=3), np.random.default_rng(0), T)
    assert greedy.shape == (3, 3, T) and (greedy == greedy[:, :1]).all()
    sampled = generate_candidates(backend, pixels[:3], SearchOptions(do_sample=True, temperature=3.0, num_return=3),
                                  np.random.default_rng(0), T)
    assert sampled.shape == (3, 3, T) and not (sampled == sampled[:, :1]).all()


def test_slot_cache_writes_rows_at_the_end_and_compacts():
    cache = SlotCache(n_tensors=2, batch=3, n_head=1, head_dim=2, capacity=6, length=2)
    kv = [np.full((2, 1, 2, 2), v, np.float32) + np.arange(2)[:, None, None, None] for v in (10, 20)]
    cache.write_rows(np.array([2, 0]), np.array([0, 1]), kv)  # row 2 ← video 0, row 0 ← video 1
    key = cache.past()[0]
    assert key.shape == (3, 1, 2, 2) and key[2, 0, :, 0].tolist() == [10, 10] and key[0, 0, 0, 0] == 11
    for present in cache.next_present():  # what a decoder step writes: the past plus one column
        present[:, :, :2] = 0
        present[:, :, 2] = 7
    cache.advance()
    assert cache.length == 3 and cache.past()[1][:, 0, 2, 0].tolist() == [7, 7, 7]
    cache.compact(2)
    assert cache.length == 1 and cache.past()[0].flags.c_contiguous and (cache.past()[0] == 7).all()
    with pytest.raises(ValueError, match="cache full"):
        cache.next_present(new_columns=6)

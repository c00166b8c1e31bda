"""Continuous batching and the slot KV cache: greedy captions equal one-at-a-time decoding and
the PyTorch reference; sampling is reproducible whatever the number of slots."""
import threading

import numpy as np
import pytest

from v2t_engine.runtime.backends.ort import OrtBackend
from v2t_engine.runtime.generator import EncodeAhead, generate_candidates, stream_captions
from v2t_engine.runtime.search import SearchOptions


N_VIDEOS = 24


@pytest.fixture(scope="module")
def backend(random_export):
    return OrtBackend(random_export)


@pytest.fixture(scope="module")
def pixels(test_pixels):
    """(N, F, 3, S, S) uint8 crops of the first held-out clips."""
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


@pytest.mark.parametrize("opts", [SearchOptions(), SearchOptions(num_beams=3, num_return=2)], ids=["greedy", "beams"])
def test_padded_batch_buckets_give_the_same_tokens(random_export, backend, pixels, opts):
    """Where a backend runs a captured graph per batch size (ORT on CUDA), a step runs rows up to
    the next power of two, idle rows included: those rows must change nothing."""
    bucketed = OrtBackend(random_export)
    bucketed.batch_buckets = True
    assert np.array_equal(caption_all(bucketed, pixels, opts, slots=7), caption_all(backend, pixels, opts, slots=7))


def test_ort_greedy_tokens_equal_pytorch_reference(random_checkpoint, backend, pixels):
    torch = pytest.importorskip("torch")
    from v2t_engine.inputs.preprocess import normalize
    from v2t_training.checkpoint import load_model

    model, _ = load_model(random_checkpoint)
    reference = model.eval().generate_greedy(torch.from_numpy(normalize(pixels))).numpy()
    assert np.array_equal(caption_all(backend, pixels, slots=5)[:, 0], reference)


def test_sampling_is_reproducible_and_independent_of_slots(backend, pixels):
    opts = SearchOptions(do_sample=True, top_k=20, temperature=1.5, num_return=2)
    pixels = pixels[:12]
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




def ahead(backend):
    """The backend, as the generator sees one whose encoder runs on a device (EncodeAhead)."""
    class EncodesAhead:
        encodes_ahead = True

        def __getattr__(self, name):
            return getattr(backend, name)
    return EncodesAhead()


@pytest.mark.parametrize("opts, slots", [(SearchOptions(), 3), (SearchOptions(num_beams=3, num_return=2), 8),
                                         (SearchOptions(do_sample=True, top_k=20, num_return=2), 5)],
                         ids=["greedy", "beams", "sampled"])
def test_encoding_ahead_gives_the_same_tokens(backend, pixels, opts, slots):
    """Encoded on other threads, batches ahead, partly taken: the captions of encoding in each refill."""
    assert np.array_equal(caption_all(ahead(backend), pixels, opts, slots, seed=2),
                          caption_all(backend, pixels, opts, slots, seed=2))


def test_encoding_ahead_reads_in_the_callers_thread_and_a_bounded_window_ahead(backend, pixels):
    slots = 4
    readers, read, finished = set(), [], []

    def videos():
        for i, p in enumerate(pixels):
            readers.add(threading.current_thread())
            read.append(i)
            yield i, p

    for key, _ in stream_captions(ahead(backend), videos(), SearchOptions(), backend.config.text_len, slots):
        finished.append(key)
        # Slots hold `slots` videos; EncodeAhead holds IN_FLIGHT batches of `slots` more, and
        # fewer than a batch encoded but not yet taken.
        assert len(read) - len(finished) < slots * (2 + EncodeAhead.IN_FLIGHT)
    assert readers == {threading.current_thread()}
    assert sorted(finished) == list(range(len(pixels)))
    assert not [t for t in threading.enumerate() if t.name.startswith("v2t-encode")]  # the pool is shut down


def test_encoding_ahead_passes_on_errors_and_stops_its_threads(backend, pixels):
    bad = [(i, p) for i, p in enumerate(pixels[:8])] + [(8, pixels[8][:1])]  # one video with 1 frame
    with pytest.raises(ValueError, match="frames"):
        list(stream_captions(ahead(backend), bad, SearchOptions(), backend.config.text_len, slots=4))
    stream = stream_captions(ahead(backend), enumerate(pixels), SearchOptions(), backend.config.text_len, slots=2)
    next(stream)
    stream.close()  # a consumer that stops early
    assert not [t for t in threading.enumerate() if t.name.startswith("v2t-encode")]

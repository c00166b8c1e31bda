"""Token selection and the generation loop on hand-made logits."""
import numpy as np
import pytest

from v2t_engine.config import ModelConfig
from v2t_engine.errors import ConfigError
from v2t_engine.runtime.generator import generate_candidates
from v2t_engine.runtime.search import SearchOptions, select_tokens, token_probabilities


def test_greedy_is_argmax():
    logits = np.array([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]], np.float32)
    assert select_tokens(logits, SearchOptions(), np.random.default_rng(0)).tolist() == [1, 0]


def test_top_k_one_and_tiny_top_p_are_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 50)).astype(np.float32)
    want = logits.argmax(-1)
    for opts in (SearchOptions(do_sample=True, top_k=1), SearchOptions(do_sample=True, top_p=1e-6)):
        assert (select_tokens(logits, opts, np.random.default_rng(1)) == want).all()


def test_sampling_is_reproducible_with_a_seed_and_varies_without():
    logits = np.zeros((32, 100), np.float32)
    opts = SearchOptions(do_sample=True)
    a = select_tokens(logits, opts, np.random.default_rng(7))
    b = select_tokens(logits, opts, np.random.default_rng(7))
    c = select_tokens(logits, opts, np.random.default_rng(8))
    assert (a == b).all() and not (a == c).all()


def test_sampling_follows_the_distribution_and_filters():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(np.tile(probs, (20000, 1)))
    rng = np.random.default_rng(0)
    freq = np.bincount(select_tokens(logits, SearchOptions(do_sample=True), rng), minlength=4) / 20000
    assert np.allclose(freq, probs, atol=0.02)
    # top_k=2 renormalizes over the two best; top_p=0.6 keeps {0, 1} (0.5 < 0.6 <= 0.8).
    for opts in (SearchOptions(do_sample=True, top_k=2), SearchOptions(do_sample=True, top_p=0.6)):
        freq = np.bincount(select_tokens(logits, opts, rng), minlength=4) / 20000
        assert freq[2] == freq[3] == 0
        assert abs(freq[0] - 0.5 / 0.8) < 0.02
    # A low temperature sharpens towards the argmax.
    freq = np.bincount(select_tokens(logits, SearchOptions(do_sample=True, temperature=0.1), rng), minlength=4)
    assert freq[0] / 20000 > 0.99


def test_token_probabilities_filter_and_renormalize():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    probs = token_probabilities(logits, SearchOptions(do_sample=True, top_k=2))
    assert np.allclose(probs[0], [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    assert np.allclose(probs[1], 0.25)  # four tokens tie at the 2nd value: all kept
    probs = token_probabilities(logits, SearchOptions(do_sample=True, top_p=0.6))
    assert np.allclose(probs[0], [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    assert np.allclose(token_probabilities(logits, SearchOptions(do_sample=True, top_k=9)).sum(-1), 1)


class FixedDraws:
    """A generator whose uniform draws are given: the ends of [0, 1) that a real one rarely hits."""

    def __init__(self, u):
        self.u = u

    def random(self, shape):
        return np.full(shape, self.u)


def test_filtered_tokens_are_never_drawn_even_at_the_ends_of_the_draw():
    logits = np.array([[0.0, 5.0, 4.0, 0.0]])  # top_k=2 leaves tokens 1 and 2
    opts = SearchOptions(do_sample=True, top_k=2)
    assert select_tokens(logits, opts, FixedDraws(0.0)).tolist() == [1]
    # Here the kept mass sums to 1 - 2**-52 in float64, below the largest draw: the last kept
    # token, not the filtered one after it.
    logits = np.array([[1.3458754237823045, 0.7813114007004275, 0.2644556303293035, -0.3139228145364278,
                        1.4580206835369587, -50.0]])
    opts = SearchOptions(do_sample=True, top_k=5)
    assert np.cumsum(token_probabilities(logits, opts))[-1] < np.nextafter(1.0, 0.0)
    assert select_tokens(logits, opts, FixedDraws(np.nextafter(1.0, 0.0))).tolist() == [4]


@pytest.mark.parametrize("kwargs", [{"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"temperature": 0.0},
                                    {"num_return": 0}])
def test_bad_options_are_rejected(kwargs):
    with pytest.raises(ConfigError):
        SearchOptions(**kwargs)


class ScriptedBackend:
    """A decoder whose next token is a lookup: the first from the video (its frames' pixel value),
    each later one from the previous token, so the loop's stop and padding rules can be checked
    exactly. Frames filled with v start the caption first[v]; token t is followed by after[t]."""

    name = "scripted"

    def __init__(self, first, after, vocab=6, pad=0):
        self.config = ModelConfig(vocab_size=vocab, pad_id=pad, frame_num=2, img_size=16, text_len=5,
                                  n_layer=1, n_head=1, n_embd=4, vit_width=4, vit_layers=1, vit_heads=1,
                                  vit_patch_size=8)
        self.first, self.after = first, after
        self.steps = 0

    def encode_frames(self, frames):
        return np.repeat(frames[:, :1, 0, 0], 4, axis=1).astype(np.float32)

    def decoder_step(self, inputs, past, present):
        for p, q in zip(past, present):
            q[:, :, :p.shape[2]] = p
            q[:, :, p.shape[2]:] = 0
        if inputs.prefix_embeds.shape[1]:
            nxt = [self.first[int(v)] for v in inputs.prefix_embeds[:, -1, 0]]
        else:
            self.steps += 1
            nxt = [self.after[int(t)] for t in inputs.input_ids[:, 0]]
        logits = np.zeros((inputs.input_ids.shape[0], self.config.vocab_size), np.float32)
        logits[np.arange(len(nxt)), nxt] = 1.0
        return logits


def videos(*values):
    return np.stack([np.full((2, 3, 16, 16), v, np.float32) for v in values])


def test_generation_stops_at_pad_and_pads_finished_captions():
    # Video 0: 3 4 [PAD]; video 1: 2 [PAD]. After [PAD] the script would go on (0 → 5), but an
    # ended caption stays [PAD]-filled, and the loop stops once both ended, not at the limit.
    backend = ScriptedBackend(first={0: 3, 1: 2}, after={3: 4, 4: 0, 2: 0, 0: 5, 5: 5})
    out = generate_candidates(backend, videos(0, 1), SearchOptions(), np.random.default_rng(0), 5)
    assert out[:, 0].tolist() == [[3, 4, 0, 0, 0], [2, 0, 0, 0, 0]]
    assert backend.steps == 2


def test_generation_respects_the_length_limit():
    backend = ScriptedBackend(first={0: 1}, after={1: 2, 2: 3, 3: 4, 4: 5, 5: 5})
    out = generate_candidates(backend, videos(0), SearchOptions(), np.random.default_rng(0), 3)
    assert out[:, 0].tolist() == [[1, 2, 3]] and backend.steps == 2


def test_greedy_candidates_are_computed_once_and_repeated():
    backend = ScriptedBackend(first={0: 2}, after={2: 0, 0: 0})
    out = generate_candidates(backend, videos(0), SearchOptions(num_return=3), np.random.default_rng(0), 4)
    assert out.shape == (1, 3, 4) and (out == [2, 0, 0, 0]).all()
    assert backend.steps == 1  # one caption decoded, not three

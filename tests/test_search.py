"""Token selection and the generation loop on hand-made logits."""
import numpy as np
import pytest

from v2t_engine.config import ModelConfig
from v2t_engine.errors import ConfigError
from v2t_engine.runtime.generator import generate_candidates
from v2t_engine.runtime.search import (BeamSearch, SearchOptions, adjust_logits, banned_ngram_tokens,
                                       log_softmax, select_tokens, step_beams, token_probabilities)


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

    xp = np

    def prefill(self, prefix, logits, kv_out):
        self._answer([self.first[int(v)] for v in prefix[:, -1, 0]], logits, kv_out)

    def decode(self, input_ids, position_ids, cache, logits, kv_out):
        self.steps += 1
        self._answer([self.after[int(t)] for t in input_ids[:, 0]], logits, kv_out)

    @staticmethod
    def _answer(nxt, logits, kv_out):
        for t in kv_out:
            t[...] = 0
        logits[...] = 0
        logits[np.arange(len(nxt)), nxt] = 1.0


def videos(*values):
    return np.stack([np.full((2, 3, 16, 16), v, np.uint8) for v in values])


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


# ----------------------------------------------------------------------------- beam search
def markov_logits(vocab, seed):
    """A tiny 'model' on injected logits: each prefix's next-token logits drawn from a generator
    keyed by the prefix, so every prefix has its own distribution."""
    def logits_of(tokens, length):
        rows = []
        for prefix in tokens[:, :length].tolist():
            rng = np.random.default_rng([seed, len(prefix), *prefix])
            rows.append(rng.normal(scale=2.0, size=vocab))
        return np.array(rows, np.float32)
    return logits_of


def run_beams(opts, logits_of, max_new, pad=0):
    beams = BeamSearch(opts, max_new, pad)
    while not beams.done:
        beams.step(logits_of(beams.tokens, beams.length))
    return beams


def exhaustive(logits_of, vocab, max_new, pad=0, length_penalty=0.0):
    """Every caption up to max_new tokens ([PAD] only at its end), scored like a finished beam,
    best first."""
    scored, live = [], [((), 0.0)]
    for n in range(1, max_new + 1):
        grown = []
        for prefix, total in live:
            tokens = np.full((1, max_new), pad, np.int64)
            tokens[0, :len(prefix)] = prefix
            logp = log_softmax(logits_of(tokens, len(prefix)))[0]
            for t in range(vocab):
                seq, s = prefix + (t,), total + logp[t]
                if t == pad or n == max_new:
                    scored.append((s / n ** length_penalty, seq))
                else:
                    grown.append((seq, s))
        live = grown
    return sorted(scored, key=lambda c: -c[0])


def padded(seq, max_new, pad=0):
    return list(seq) + [pad] * (max_new - len(seq))


@pytest.mark.parametrize("vocab, max_new", [(4, 3), (3, 4)])
def test_a_beam_wide_enough_to_prune_nothing_is_an_exhaustive_search(vocab, max_new):
    """With length_penalty 0 and K at least every step's candidates, beam search must return the
    K best captions of all V^T, in order, with their scores."""
    logits_of = markov_logits(vocab, seed=vocab * 10 + max_new)
    K = (vocab - 1) ** (max_new - 1) * vocab  # the candidates of the last step
    opts = SearchOptions(num_beams=K, num_return=K, length_penalty=0.0)
    beams = run_beams(opts, logits_of, max_new)
    want = exhaustive(logits_of, vocab, max_new)[:K]
    assert beams.best(K).tolist() == [padded(seq, max_new) for _, seq in want]
    assert np.allclose(beams.best_scores(K), [s for s, _ in want])


def reference_beams(logits_of, K, max_new, length_penalty, early_stopping, pad=0):
    """Beam search written plainly over lists of (prefix, sum of log-probs)."""
    beams, finished = [((), 0.0)], []
    for n in range(1, max_new + 1):
        candidates = []
        for prefix, total in beams:
            tokens = np.array([padded(prefix, max_new)])
            logp = log_softmax(logits_of(tokens, len(prefix)))[0]
            candidates += [(prefix + (t,), total + logp[t]) for t in range(len(logp))]
        candidates.sort(key=lambda c: -c[1])  # stable: beam order, then token order
        for seq, total in candidates[:K]:
            if seq[-1] == pad or n == max_new:
                finished.append((total / n ** length_penalty, seq))
        finished = sorted(finished, key=lambda f: -f[0])[:K]
        beams = [c for c in candidates[:2 * K] if c[0][-1] != pad][:K]
        if n == max_new or len(finished) == K and (
                early_stopping or max(s for _, s in beams) / n ** length_penalty <= finished[-1][0]):
            return finished


@pytest.mark.parametrize("K, length_penalty, early_stopping", [(2, 1.0, False), (3, 0.0, False), (3, 2.0, True),
                                                              (4, 1.0, True), (5, -0.5, False)])
def test_narrow_beams_follow_the_plain_beam_search(K, length_penalty, early_stopping):
    for seed in range(6):
        logits_of = markov_logits(6, seed)
        opts = SearchOptions(num_beams=K, num_return=K, length_penalty=length_penalty,
                             early_stopping=early_stopping)
        beams = run_beams(opts, logits_of, max_new=6)
        want = reference_beams(logits_of, K, 6, length_penalty, early_stopping)
        assert beams.best(len(want)).tolist() == [padded(seq, 6) for _, seq in want]


def greedy_run(logits_of, max_new, pad=0):
    tokens = np.full((1, max_new), pad, np.int64)
    for n in range(max_new):
        tokens[0, n] = select_tokens(logits_of(tokens, n), SearchOptions(), None)[0]
        if tokens[0, n] == pad:
            break
    return tokens[0].tolist()


@pytest.mark.parametrize("opts", [SearchOptions(num_beams=1, length_penalty=0.0),
                                  SearchOptions(num_beams=1, early_stopping=True)])
def test_one_beam_is_greedy(opts):
    for seed in range(20):
        logits_of = markov_logits(5, seed)
        assert run_beams(opts, logits_of, max_new=6).best(1).tolist() == [greedy_run(logits_of, 6)]


def test_beams_find_the_caption_greedy_misses():
    """Greedy takes the likelier first token and then faces a flat distribution; two beams keep
    the other first token, whose caption is the likelier whole."""
    table = {(): [-9, 1.0, 0.8, -9], (1,): [0, 0, 0, 0], (2,): [9, -9, -9, -9]}

    def logits_of(tokens, length):
        return np.array([table.get(tuple(r[:length]), [9, -9, -9, -9]) for r in tokens.tolist()], np.float32)

    assert greedy_run(logits_of, 3)[:1] == [1]
    beams = run_beams(SearchOptions(num_beams=2, num_return=2, length_penalty=0.0), logits_of, 3)
    assert beams.best(2)[0].tolist() == [2, 0, 0]
    assert exhaustive(logits_of, 4, 3)[0][1] == (2, 0)


def test_length_penalty_trades_length_for_likelihood():
    # "1 [PAD]" has the larger sum, "2 3 [PAD]" the larger mean log-probability.
    table = {(): [-9, 0.0, -0.5, -9], (1,): [-1.2, -9, -9, -9], (2,): [-9, -9, -9, 0.0],
             (2, 3): [0.0, -9, -9, -9]}

    def logits_of(tokens, length):
        return np.array([table.get(tuple(r[:length]), [0, -9, -9, -9]) for r in tokens.tolist()], np.float32)

    short = run_beams(SearchOptions(num_beams=2, length_penalty=0.0), logits_of, 4).best(1)[0]
    long = run_beams(SearchOptions(num_beams=2, length_penalty=2.0), logits_of, 4).best(1)[0]
    assert short.tolist()[:2] == [1, 0] and long.tolist()[:3] == [2, 3, 0]


def test_no_repeat_ngram_and_repetition_penalty():
    assert sorted(banned_ngram_tokens(np.array([5, 6, 5, 7, 5]), 2).tolist()) == [6, 7]
    assert banned_ngram_tokens(np.array([5, 6]), 3).tolist() == []
    assert sorted(banned_ngram_tokens(np.array([1, 2, 1]), 1).tolist()) == [1, 1, 2]
    logits = np.array([[2.0, -1.0, 3.0, 0.5]], np.float32)
    history, n = np.array([[0, 1, 3]]), np.array([2])  # tokens 0 and 1 written; 3 not yet
    out = adjust_logits(logits, history, n, SearchOptions(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]]
    out = adjust_logits(logits, np.array([[2, 1, 2]]), np.array([3]), SearchOptions(no_repeat_ngram_size=2))
    assert out[0, 1] == -np.inf and np.isfinite(out[0, [0, 2, 3]]).all()
    assert adjust_logits(logits, history, n, SearchOptions()) is logits


def test_beam_captions_never_repeat_a_blocked_ngram():
    # A model that loops 1 2 1 2 ... unless stopped; 3 and [PAD] are the way out.
    nxt = {-1: [-4, 3, 0, 0], 0: [5, -4, -4, -4], 1: [-2, -4, 3, 0], 2: [-2, 3, -4, 0], 3: [1, 0.5, 0.5, -4]}

    def logits_of(tokens, length):
        return np.array([nxt[r[length - 1] if length else -1] for r in tokens.tolist()], np.float32)

    for opts in (SearchOptions(num_beams=3, num_return=3, no_repeat_ngram_size=2),
                 SearchOptions(num_beams=3, num_return=3)):
        captions = run_beams(opts, logits_of, max_new=8).best(opts.num_return)
        grams = [[tuple(c[i:i + 2]) for i in range(len(c) - 1) if 0 not in c[i:i + 2]] for c in captions.tolist()]
        repeats = any(len(g) != len(set(g)) for g in grams)
        assert repeats == (opts.no_repeat_ngram_size == 0), captions  # without the block, it loops


def test_greedy_and_sampling_take_the_repetition_options_too():
    backend = ScriptedBackend(first={0: 2}, after={2: 3, 3: 2, 0: 0}, vocab=6)
    plain = generate_candidates(backend, videos(0), SearchOptions(), np.random.default_rng(0), 5)
    assert plain[0, 0].tolist() == [2, 3, 2, 3, 2]
    blocked = generate_candidates(backend, videos(0), SearchOptions(no_repeat_ngram_size=2),
                                  np.random.default_rng(0), 5)
    assert blocked[0, 0].tolist()[:3] == [2, 3, 2] and blocked[0, 0, 3] != 3


@pytest.mark.parametrize("kwargs, message", [
    ({"num_beams": 0}, "num_beams"), ({"num_beams": 3, "do_sample": True}, "beam sampling"),
    ({"num_beams": 2, "num_return": 3}, "max_generated_num=3"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size")])
def test_bad_beam_options_are_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SearchOptions(**kwargs)


def test_videos_stepped_together_search_as_they_would_alone():
    """step_beams on videos that started at different steps, with different logits, gives each
    the beams it gets alone."""
    opts = SearchOptions(num_beams=3, num_return=3, no_repeat_ngram_size=2)
    models = [markov_logits(7, seed) for seed in range(4)]
    alone = [run_beams(opts, m, max_new=7).best(3).tolist() for m in models]
    searches = [BeamSearch(opts, 7, 0) for _ in models]
    for t in range(20):
        running = [i for i in range(min(t + 1, len(models))) if not searches[i].done]  # video i joins at step i
        if not running and t >= len(models):
            break
        if running:
            logits = np.stack([models[i](searches[i].tokens, searches[i].length) for i in running])
            step_beams([searches[i] for i in running], logits)
    assert [s.best(3).tolist() for s in searches] == alone

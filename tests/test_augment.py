"""Training-time views (training/augment.py): one shift per clip, labels untouched."""
import pytest

torch = pytest.importorskip("torch")

from v2t_training.augment import augment_batch  # noqa: E402


def clips(B=4, Fr=3, S=12):
    # A single bright pixel per frame at a frame-dependent place: easy to locate after a shift.
    frames = torch.zeros(B, Fr, 3, S, S)
    for b in range(B):
        for f in range(Fr):
            frames[b, f, :, 4 + f, 5] = 1.0
    return frames, torch.arange(B * 5).reshape(B, 5)


def peak(frame):
    idx = int(frame[0].argmax())
    return divmod(idx, frame.shape[-1])


def test_views_repeat_the_batch_with_one_shift_per_clip():
    frames, tokens = clips()
    out, out_tokens = augment_batch(frames, tokens, views=3, max_shift=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (12, 3, 3, 12, 12) and torch.equal(out_tokens, tokens.repeat(3, 1))
    shifts = set()
    for i in range(12):
        places = [peak(out[i, f]) for f in range(3)]
        dy, dx = places[0][0] - 4, places[0][1] - 5
        assert abs(dy) <= 2 and abs(dx) <= 2
        # every frame of the clip moved by the same offset: the motion between frames is kept
        assert places == [(4 + f + dy, 5 + dx) for f in range(3)]
        shifts.add((dy, dx))
    assert len(shifts) > 1  # views differ


def test_no_shift_and_one_view_is_the_identity():
    frames, tokens = clips()
    out, out_tokens = augment_batch(frames, tokens, views=1, max_shift=0)
    assert torch.equal(out, frames) and torch.equal(out_tokens, tokens)


def test_borders_repeat_the_edge():
    frames = torch.arange(16.0).reshape(1, 1, 1, 4, 4).expand(1, 1, 3, 4, 4).contiguous()
    out, _ = augment_batch(frames, torch.zeros(1, 2, dtype=torch.long), views=1, max_shift=4,
                           generator=torch.Generator().manual_seed(3))
    assert set(out.unique().tolist()) <= set(range(16))  # no zeros/constants invented at the edge


def test_bad_arguments():
    frames, tokens = clips()
    with pytest.raises(ValueError, match="views must be >= 1"):
        augment_batch(frames, tokens, views=0, max_shift=1)

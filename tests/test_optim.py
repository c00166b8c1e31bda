"""The training optimizer (training/optim.py): Muon on hidden matrices, AdamW elsewhere."""
import pytest

torch = pytest.importorskip("torch")

from v2t_training.optim import MuonAdamW, orthogonalize  # noqa: E402


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_orthogonalize_flattens_the_spectrum(shape):
    g = torch.Generator().manual_seed(0)
    k = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=g))[0]
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=g))[0]
    m = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # singular values 0.1 .. 10
    s = torch.linalg.svdvals(orthogonalize(m))
    assert s.max() < 1.25 and s.min() > 0.5  # every direction now moves at about the same rate


def test_muon_step_size_matches_adamw_rms_and_both_descend():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 16) * 0.1)
    b = torch.nn.Parameter(torch.zeros(64))
    opt = MuonAdamW([{"params": [w], "muon": True}, {"params": [b]}], lr=1e-2)
    x = torch.randn(256, 16)
    target = x @ torch.randn(64, 16).T * 0.3 + 0.5  # reachable: a linear map plus an offset
    before = w.detach().clone()
    losses = []
    for _ in range(30):
        loss = ((x @ w.T + b - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) == 1:  # the first update's RMS is 0.2 * lr (Moonshot's AdamW-matching scale)
            rms = (w.detach() - before).pow(2).mean().sqrt().item()
            assert rms == pytest.approx(0.2 * 1e-2, rel=0.3)
    assert losses[-1] < 0.7 * losses[0]
    assert b.abs().sum() > 0  # the AdamW group moved too


def test_state_dict_round_trip_resumes_identically():
    def run(steps, opt_state=None, w0=None):
        torch.manual_seed(1)
        w = torch.nn.Parameter(torch.randn(12, 4) if w0 is None else w0.clone())
        opt = MuonAdamW([{"params": [w], "muon": True, "blocks": 3}], lr=1e-2, weight_decay=0.1)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        for i in range(steps):
            (w.sum(0) * torch.arange(4.0)).sum().backward()
            opt.step()
            opt.zero_grad()
        return w.detach(), opt.state_dict()

    straight, _ = run(4)
    half, state = run(2)
    resumed, _ = run(2, state, half)
    assert torch.equal(straight, resumed)


def test_muon_refuses_what_it_cannot_orthogonalize():
    with pytest.raises(ValueError, match="split into 3 blocks"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "muon": True, "blocks": 3}], lr=1e-3)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(4))], "muon": True}], lr=1e-3)

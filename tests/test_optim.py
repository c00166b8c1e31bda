"""The training optimizer (training/optim.py): Muon on hidden matrices, AdamW elsewhere, the
parameter groups that choose between them, and the learning-rate schedule."""
import pytest

torch = pytest.importorskip("torch")

from v2t_engine.config import ModelConfig  # noqa: E402
from v2t_training.model import VideoCaptioner  # noqa: E402
from v2t_training.optim import MuonAdamW, lr_lambda, orthogonalize, param_groups  # noqa: E402


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


def test_muon_takes_hidden_matrices_and_adamw_the_tables():
    model = VideoCaptioner(ModelConfig(vocab_size=20, frame_num=2, img_size=32, text_len=4, n_layer=1, n_head=2,
                                       n_embd=32, vit_width=32, vit_layers=1, vit_heads=2, vit_patch_size=16))
    names = {id(p): n for n, p in model.named_parameters()}
    rule = {names[id(p)]: (g["muon"], g["blocks"], g["weight_decay"])
            for g in param_groups(model, 0.1, 1e-3, muon=True) for p in g["params"]}
    assert rule["first_stage_model.conv1.weight"] == (True, 1, 0.1)  # a Conv, flattened to a matrix
    assert rule["first_stage_model.transformer.resblocks.0.attn.in_proj_weight"] == (True, 3, 0.1)  # q, k, v
    assert rule["transformer.blocks.0.attn.query.weight"] == (True, 1, 0.1)
    assert rule["transformer.blocks.0.mlp.0.weight"] == (True, 1, 0.1)
    for table in ("transformer.tok_emb.weight", "transformer.pos_emb", "first_stage_model.positional_embedding",
                  "first_stage_model.class_embedding"):
        assert rule[table] == (False, 1, 0.0)
    assert rule["transformer.head.weight"] == (False, 1, 0.1)  # AdamW, decayed like minGPT's head
    assert rule["transformer.blocks.0.attn.query.bias"] == (False, 1, 0.0)
    assert rule["transformer.ln_f.weight"] == (False, 1, 0.0)
    assert len(rule) == len(list(model.parameters()))


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    factor = lr_lambda(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert [factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert factor(10) == pytest.approx(1.0)  # the peak, then cosine
    assert factor(55) == pytest.approx(0.55)  # half way down: the floor plus half the rest
    assert factor(100) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)

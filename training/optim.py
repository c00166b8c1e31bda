"""The optimizer: Muon for the hidden weight matrices, AdamW for everything else; the parameter
groups that give each tensor its rule, and the learning-rate schedule.

Why Muon: with AdamW at the README recipe's step count, the ViT trained from scratch learned
shapes too slowly. Muon (momentum, then each matrix's update replaced by the nearest
semi-orthogonal matrix through a Newton-Schulz iteration) updates every direction of a matrix at
the same rate instead of letting a few dominant directions take the whole step; the same run then
captioned far more clips exactly (measured values: README, "Training defaults"). Embedding tables, position
tables, the output head, biases and LayerNorm gains are not hidden matrices (their rows or
entries are looked up or scaled individually) and keep AdamW.

The Muon update is rescaled by 0.2 * sqrt(max(rows, cols)), which gives it the root-mean-square
size of a typical AdamW update, so one learning rate and one schedule serve both kinds of
parameter (the scaling proposed by Moonshot AI for Muon at scale).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

# Coefficients of the quintic Newton-Schulz step tuned for Muon (Keller Jordan): in 5 steps they
# move every singular value of X / ||X|| into roughly [0.7, 1.2] rather than exactly to 1, which
# trains as well as the exact U V^T and costs a handful of small matrix products.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(m: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """m = U S V^T (2-D) -> roughly U V^T, by the quintic Newton-Schulz iteration."""
    a, b, c = NS_COEFFICIENTS
    x = m.float()
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1: the iteration converges
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(m.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer for two update rules, so one LR scheduler and one state dict cover all.

    Each parameter group says its rule: ``{"muon": True, "blocks": k}`` orthogonalizes the update
    of each matrix (Conv weights flattened to out x in*kh*kw) split row-wise into k blocks (3 for
    a fused q/k/v projection: three maps, each orthogonalized on its own); ``{"muon": False}`` is
    AdamW. Weight decay is decoupled in both.
    """

    def __init__(self, params: Iterable[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, momentum: float = 0.95, weight_decay: float = 0.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, weight_decay=weight_decay,
                        muon=False, blocks=1)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"]:
                for p in group["params"]:
                    if p.ndim < 2 or p.shape[0] % group["blocks"]:
                        raise ValueError(f"Muon needs matrices whose rows split into {group['blocks']} "
                                         f"blocks; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                if group["muon"]:
                    self._muon_update(p, group)
                else:
                    self._adamw_update(p, group)
        return loss

    def _muon_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - mu)
        update = p.grad.lerp(buf, mu)  # Nesterov momentum
        blocks = update.reshape(p.shape[0], -1).chunk(group["blocks"])
        rows, cols = blocks[0].shape
        ortho = torch.cat([orthogonalize(b) for b in blocks])
        p.add_(ortho.view_as(p), alpha=-group["lr"] * 0.2 * math.sqrt(max(rows, cols)))

    def _adamw_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)


# Trainable tensors that are tables looked up or read row by row, not maps between hidden
# spaces: they keep AdamW under Muon.
_TABLES = ("transformer.tok_emb.weight", "transformer.pos_emb", "transformer.head.weight",
           "first_stage_model.class_embedding", "first_stage_model.positional_embedding")


def param_groups(model: nn.Module, weight_decay: float, lr: float, encoder_lr_scale: float = 1.0,
                 muon: bool = False) -> list[dict[str, Any]]:
    """Parameter groups for ``MuonAdamW``.

    minGPT's decay rule: decay the weight matrices of Linear/Conv layers (and the ViT's fused
    in_proj and proj matrices), never biases, LayerNorms, embeddings or position tables. With
    ``muon`` those matrices are updated by Muon (the fused q/k/v in_proj as three blocks), the
    rest by AdamW; without it everything is AdamW. The frame encoder (``first_stage_model``)
    learns at ``encoder_lr_scale`` times ``lr``."""
    matrices = _weight_matrices(model)
    groups: dict[tuple[bool, int, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = name in matrices or name == "transformer.head.weight"
            blocks = (3 if name.endswith("in_proj_weight") else 1) if muon and name in matrices else 0
            groups.setdefault((decay, blocks, name.startswith("first_stage_model.")), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "muon": blocks > 0,
             "blocks": max(1, blocks), "lr": lr * (encoder_lr_scale if encoder else 1.0)}
            for (decay, blocks, encoder), params in sorted(groups.items())]


def _weight_matrices(model: nn.Module) -> set[str]:
    """Names of the parameters that map one hidden space to another."""
    matrices = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            matrices.add(prefix + "weight")
        for pname in ("in_proj_weight", "proj"):
            if isinstance(getattr(module, pname, None), nn.Parameter):
                matrices.add(prefix + pname)
    return matrices - set(_TABLES)  # the output head is a Linear but a table of token vectors


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine decay to ``min_ratio`` of it at the last step
    (a LambdaLR factor, so the one schedule scales every group's own learning rate)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor

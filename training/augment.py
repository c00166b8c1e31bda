"""Training-time augmentation of a batch of clips: several shifted views of each clip.

Why: a ViT trained from scratch on a few thousand clips memorises them (training loss far below
validation loss) and learns shapes slowly. Two label-preserving changes fix most of that
(measured values: README, "Training defaults"):

* shift: every frame of a clip moves by the same random offset of up to ``max_shift`` pixels,
  the border repeated. One offset per clip keeps the motion between its frames intact; no flips
  or colour changes, which would change what the caption says (left/right, up/down, colour).
* views: each clip is seen ``views`` times per step, each with its own shift (batch
  augmentation, Hoffer et al. 2019). Below the critical batch size every step learns more from
  more samples; the CPU recipe has time to spare for it but a fixed number of steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def augment_batch(frames: torch.Tensor, tokens: torch.Tensor, views: int, max_shift: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """frames (B, F, 3, S, S), tokens (B, T) -> (views*B, F, 3, S, S), (views*B, T): the batch
    repeated ``views`` times, each copy of each clip shifted by its own offset in
    [-max_shift, max_shift]^2."""
    if views < 1 or max_shift < 0:
        raise ValueError(f"views must be >= 1 and max_shift >= 0, got {views} and {max_shift}")
    frames, tokens = frames.repeat(views, 1, 1, 1, 1), tokens.repeat(views, 1)
    if max_shift == 0:
        return frames, tokens
    B, Fr, C, S, _ = frames.shape
    m = max_shift
    padded = F.pad(frames.reshape(B, Fr * C, S, S), (m, m, m, m), mode="replicate")  # (B, F*C, S+2m, S+2m)
    offsets = torch.randint(0, 2 * m + 1, (B, 2), generator=generator, device=frames.device).tolist()
    crops = [padded[b, :, dy:dy + S, dx:dx + S] for b, (dy, dx) in enumerate(offsets)]
    return torch.stack(crops).reshape(B, Fr, C, S, S), tokens

"""PyTorch reference backend over a training checkpoint. Imports torch (and v2t_training)
lazily, only when chosen, so the ONNX Runtime path never loads them."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class TorchBackend:
    name = "torch"

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu", threads: int | None = None):
        try:
            import torch
        except ImportError:
            from v2t_engine.errors import ConfigError
            raise ConfigError("the torch backend needs PyTorch: pip install torch==2.13.0 "
                              "and pip install 'v2t[train]'") from None
        from v2t_training.checkpoint import load_model

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        model, tokenizer = load_model(checkpoint_dir, map_location=self.device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.cfg

    def _t(self, array: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def encode(self, frames: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model.first_stage_model(self._t(frames)).float().cpu().numpy()

    def empty_cache(self, batch: int):
        cfg = self.config
        empty = self._torch.zeros(batch, cfg.n_head, 0, cfg.head_dim, device=self.device)
        return [(empty, empty) for _ in range(cfg.n_layer)]

    def decode(self, input_ids, prefix_embeds, position_ids, attention_mask, cache):
        with self._torch.inference_mode():
            logits, present = self.model.transformer(
                self._t(input_ids), self._t(prefix_embeds), self._t(position_ids),
                self._t(attention_mask), cache, last_only=True)
        return logits.float().cpu().numpy(), present

    def decode_into(self, input_ids, prefix_embeds, position_ids, attention_mask,
                    past: list[np.ndarray], present: list[np.ndarray]) -> np.ndarray:
        # The reference favours plain code over speed: the model allocates, the result is copied.
        pairs = [(self._t(past[2 * i]), self._t(past[2 * i + 1])) for i in range(len(past) // 2)]
        logits, cache = self.decode(input_ids, prefix_embeds, position_ids, attention_mask, pairs)
        for dst, src in zip(present, (t for kv in cache for t in kv)):
            dst[...] = src.float().cpu().numpy()
        return logits

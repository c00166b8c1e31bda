"""The PyTorch reference backend over a training checkpoint. It lives with the training stage
(it runs the training model) and registers itself with the runtime by name, as the `torch`
entry point of `v2t.backends` (pyproject.toml), so the ONNX Runtime path never imports torch."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from v2t_engine.errors import ConfigError
from v2t_engine.inputs.preprocess import normalize
from v2t_engine.runtime.contract import DecoderInputs

from .checkpoint import is_checkpoint, load_model


class TorchBackend:
    name = "torch"
    loads = ("a training checkpoint (config.json + model.safetensors, made by `v2t train`; or an EasyNLP "
             "video2text checkpoint: pytorch_model.bin + config.json + vocab.txt)")

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu", threads: int | None = None,
                 verify: bool = False, precision: str | None = None):
        del verify  # checkpoints record no digests; their loader checks every key and shape
        if precision not in (None, "fp32"):
            raise ConfigError(f"the torch backend is the fp32 reference; for --precision {precision} use "
                              "--backend torch-fast (GPU) or an export made with that precision")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.precision = "fp32"
        model, self.tokenizer = load_model(checkpoint_dir, map_location=self.device)
        self.model = model.eval()
        self.config = model.cfg

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return is_checkpoint(path)

    def _t(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        if frames.dtype == np.uint8:
            frames = normalize(frames)
        return self.model.first_stage_model(self._t(frames)).float().cpu().numpy()

    @torch.inference_mode()
    def decoder_step(self, inputs: DecoderInputs, past: Sequence[np.ndarray],
                     present: Sequence[np.ndarray]) -> np.ndarray:
        # The reference favours plain code over speed: the model allocates, the result is copied.
        pairs = [(self._t(past[2 * i]), self._t(past[2 * i + 1])) for i in range(len(past) // 2)]
        logits, cache = self.model.transformer(
            self._t(inputs.input_ids), self._t(inputs.prefix_embeds), self._t(inputs.position_ids),
            self._t(inputs.attention_mask), pairs, last_only=True)
        for dst, src in zip(present, (t for kv in cache for t in kv)):
            dst[...] = src.float().cpu().numpy()
        return logits.float().cpu().numpy()

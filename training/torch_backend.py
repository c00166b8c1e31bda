"""The PyTorch reference backend over a training checkpoint. It lives with the training stage
(it runs the training model) and registers itself with the runtime by name, as the `torch`
entry point of `v2t.backends` (pyproject.toml), so the ONNX Runtime path never imports torch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from v2t_engine.errors import ConfigError
from v2t_engine.inputs.preprocess import normalize

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
        self.xp = np
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
        if frames.dtype != np.uint8:
            raise TypeError(f"encode_frames takes uint8 crops, got {frames.dtype}")
        return self.model.first_stage_model(self._t(normalize(frames))).float().cpu().numpy()

    # The reference favours plain code over speed: the model allocates, the results are copied.
    @torch.inference_mode()
    def prefill(self, prefix: np.ndarray, logits: np.ndarray, kv_out) -> None:
        x = self._t(prefix)
        out, present = self.model.transformer(torch.zeros(x.shape[0], 0, dtype=torch.long, device=self.device),
                                              prefix_embeds=x, last_only=True)
        self._copy_out(out, present, logits, kv_out)

    @torch.inference_mode()
    def decode(self, input_ids: np.ndarray, position_ids: np.ndarray, cache, logits: np.ndarray, kv_out) -> None:
        pairs = [(self._t(cache[2 * i]), self._t(cache[2 * i + 1])) for i in range(len(cache) // 2)]
        out, new = self.model.transformer.decode(self._t(input_ids), self._t(position_ids), pairs)
        self._copy_out(out, new, logits, kv_out)

    @staticmethod
    def _copy_out(out: torch.Tensor, kv, logits: np.ndarray, kv_out) -> None:
        logits[...] = out.float().cpu().numpy()
        for dst, src in zip(kv_out, (t for pair in kv for t in pair)):
            dst[...] = src.float().cpu().numpy()

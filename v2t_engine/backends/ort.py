"""ONNX Runtime backend over an export directory."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..contract import decoder_contract, past_names
from ..errors import ConfigError
from ..manifest import Manifest

# Cache as the graph returns it: present.{i}.key|value in layer order, each (B, nh, S, hs).
OrtCache = list[np.ndarray]


def session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One intra-op pool sized to the cores; inter-op parallelism buys nothing for these
    # sequential transformer graphs.
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ConfigError("--device cuda: this onnxruntime has no CUDAExecutionProvider "
                              f"(available: {', '.join(available)}); pip install 'v2t[gpu]'")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ConfigError(f"unknown device {device!r}; use cpu or cuda")


class OrtBackend:
    name = "ort"

    def __init__(self, export_dir: str | Path, device: str = "cpu", threads: int | None = None):
        self.export_dir = Path(export_dir)
        self.manifest = Manifest.load(self.export_dir)
        self.config = self.manifest.config
        opts = session_options(threads)
        providers = providers_for(device)
        self.encoder = ort.InferenceSession(str(self.export_dir / self.manifest.encoder_file), opts,
                                            providers=providers)
        self.decoder = ort.InferenceSession(str(self.export_dir / self.manifest.decoder_file), opts,
                                            providers=providers)
        self._past_names = past_names(self.config.n_layer)
        self._output_names = decoder_contract(self.config).output_names

    def encode(self, frames: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {"frames": frames.astype(np.float32, copy=False)})[0]

    def empty_cache(self, batch: int) -> OrtCache:
        cfg = self.config
        empty = np.zeros((batch, cfg.n_head, 0, cfg.head_dim), np.float32)
        return [empty] * len(self._past_names)

    def decode(self, input_ids, prefix_embeds, position_ids, attention_mask, cache: OrtCache):
        feed = {"input_ids": input_ids, "prefix_embeds": prefix_embeds,
                "position_ids": position_ids, "attention_mask": attention_mask}
        feed.update(zip(self._past_names, cache))
        logits, *present = self.decoder.run(self._output_names, feed)
        return logits, present

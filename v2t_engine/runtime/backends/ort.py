"""ONNX Runtime backend over an export directory."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..contract import past_names, present_names
from ...errors import ConfigError
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
        self._present_names = present_names(self.config.n_layer)
        # The encoder runs on however many videos the generator is refilling (a quarter of the
        # slots, or all of them, or the table's last few), and ORT's arena keeps every chunk it
        # ever grew for those shapes: peak RSS of `v2t predict` rose 59% on a 10x longer table
        # (benchmarks/bench_predict.py, full-size int8). Shrinking the arena after each encoder
        # run hands the chunks back, which costs little beside a ViT forward; the decoder's arena
        # is left alone, its per-token runs are where allocation speed matters.
        self._encoder_run = ort.RunOptions()
        self._encoder_run.add_run_config_entry("memory.enable_memory_arena_shrinkage",
                                               "cpu:0;gpu:0" if device == "cuda" else "cpu:0")

    def encode(self, frames: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {"frames": frames.astype(np.float32, copy=False)},
                                self._encoder_run)[0]

    def empty_cache(self, batch: int) -> OrtCache:
        cfg = self.config
        empty = np.zeros((batch, cfg.n_head, 0, cfg.head_dim), np.float32)
        return [empty] * len(self._past_names)

    def decode(self, input_ids, prefix_embeds, position_ids, attention_mask, cache: OrtCache):
        cfg = self.config
        shape = (attention_mask.shape[0], cfg.n_head, attention_mask.shape[1], cfg.head_dim)
        present = [np.empty(shape, np.float32) for _ in self._present_names]
        logits = self.decode_into(input_ids, prefix_embeds, position_ids, attention_mask, cache, present)
        return logits, present

    def decode_into(self, input_ids, prefix_embeds, position_ids, attention_mask,
                    past: list[np.ndarray], present: list[np.ndarray]) -> np.ndarray:
        # IOBinding over the caller's numpy memory: the graph reads the past and writes the
        # present in place, where session.run would hand back freshly allocated outputs.
        binding = self.decoder.io_binding()
        feed = {"input_ids": input_ids, "prefix_embeds": prefix_embeds,
                "position_ids": position_ids, "attention_mask": attention_mask}
        feed.update(zip(self._past_names, past))
        for name, array in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        logits = np.empty((input_ids.shape[0], self.config.vocab_size), np.float32)
        for name, array in (("logits", logits), *zip(self._present_names, present)):
            _bind_output(binding, name, array)
        self.decoder.run_with_iobinding(binding)
        return logits


def _bind_output(binding: ort.IOBinding, name: str, array: np.ndarray) -> None:
    if array.dtype != np.float32 or not array.flags.c_contiguous:
        raise ValueError(f"{name}: output buffers must be C-contiguous float32")
    binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)

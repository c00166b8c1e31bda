"""ONNX Runtime backend over an export directory."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ...concurrency import available_cores
from ...errors import ArtifactError, ConfigError
from ...inputs.preprocess import normalize
from ...tokenizer import CaptionTokenizer
from ..contract import (LOGITS, DecoderInputs, GraphContract, decoder_contract, encoder_contract, past_names,
                        present_names)
from ..manifest import Manifest, is_export_dir

# ONNX element types as ORT reports them → numpy dtype names (the contract's spelling).
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16",
               "tensor(bfloat16)": "bfloat16", "tensor(int32)": "int32"}


def session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One intra-op pool sized to the cores; inter-op parallelism buys nothing for these
    # sequential transformer graphs.
    opts.intra_op_num_threads = threads or available_cores()
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


def unsupported_precision(precision: str, device: str) -> str | None:
    """Why ONNX Runtime on `device` cannot run an export of `precision` (None when it can): said
    before the graphs load, instead of ORT's NOT_IMPLEMENTED for some node deep inside."""
    if precision == "bf16" and device == "cpu":
        return ("ONNX Runtime's CPU provider has no bfloat16 kernels (Add, MatMul, ...; "
                "microsoft/onnxruntime#20630), so a bf16 export runs only with --device cuda")
    return None


def open_session(path: Path, contract: GraphContract, opts: ort.SessionOptions,
                 providers: list[str]) -> ort.InferenceSession:
    """An InferenceSession whose inputs and outputs are checked against the contract: a graph
    from another export or version fails here, naming the tensor, not deep inside a run."""
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as err:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/... types
        raise ArtifactError(f"{path}: ONNX Runtime cannot load this graph ({err}); re-export it "
                            "with `v2t export`") from None

    def declared(args):
        return [(a.name, _ORT_DTYPES.get(a.type, a.type), a.shape) for a in args]

    contract.check(declared(session.get_inputs()), declared(session.get_outputs()), str(path))
    return session


class OrtBackend:
    name = "ort"
    loads = "an export directory (manifest.json; made by `v2t export`)"

    def __init__(self, export_dir: str | Path, device: str = "cpu", threads: int | None = None,
                 verify: bool = False, precision: str | None = None):
        self.export_dir = Path(export_dir)
        self.manifest = Manifest.load(self.export_dir, verify=verify)
        if precision not in (None, self.manifest.precision):
            raise ConfigError(f"{self.export_dir} was exported with --precision {self.manifest.precision}, not "
                              f"{precision}: an export's precision is fixed, so export the checkpoint again with "
                              f"`v2t export --precision {precision}`")
        self.config = cfg = self.manifest.config
        self.precision = self.manifest.precision
        self.tokenizer = CaptionTokenizer.from_dir(self.export_dir / self.manifest.tokenizer_file)
        if reason := unsupported_precision(self.manifest.precision, device):
            raise ConfigError(f"{self.export_dir} is a {self.manifest.precision} export: {reason}")
        opts, providers = session_options(threads), providers_for(device)
        self.encoder = open_session(self.export_dir / self.manifest.encoder_file, encoder_contract(cfg),
                                    opts, providers)
        self.decoder = open_session(self.export_dir / self.manifest.decoder_file, decoder_contract(cfg),
                                    opts, providers)
        (self._encoder_input,) = encoder_contract(cfg).input_names
        self._past_names, self._present_names = past_names(cfg.n_layer), present_names(cfg.n_layer)
        # The encoder runs on however many videos the generator is refilling, and ORT's arena
        # keeps every chunk it ever grew for those shapes, so the peak RSS of `v2t predict` grew
        # with the length of the table (README, "Full-size results"). Shrinking the arena after
        # each encoder run hands the chunks back, which costs little beside a ViT forward; the
        # decoder's arena is left alone, its per-token runs are where allocation speed matters.
        self._encoder_run = ort.RunOptions()
        self._encoder_run.add_run_config_entry("memory.enable_memory_arena_shrinkage",
                                               "cpu:0;gpu:0" if device == "cuda" else "cpu:0")

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return is_export_dir(path)

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        if frames.dtype == np.uint8:
            frames = normalize(frames)
        feed = {self._encoder_input: frames.astype(np.float32, copy=False)}
        return self.encoder.run(None, feed, self._encoder_run)[0]

    def decoder_step(self, inputs: DecoderInputs, past: Sequence[np.ndarray],
                     present: Sequence[np.ndarray]) -> np.ndarray:
        # IOBinding over the caller's numpy memory: the graph reads the past and writes the
        # present in place, where session.run would hand back freshly allocated outputs.
        binding = self.decoder.io_binding()
        for name, array in (*inputs.feeds().items(), *zip(self._past_names, past)):
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        logits = np.empty((inputs.input_ids.shape[0], self.config.vocab_size), np.float32)
        for name, array in ((LOGITS, logits), *zip(self._present_names, present)):
            _bind_output(binding, name, array)
        self.decoder.run_with_iobinding(binding)
        return logits


def _bind_output(binding: ort.IOBinding, name: str, array: np.ndarray) -> None:
    if array.dtype != np.float32 or not array.flags.c_contiguous:
        raise ValueError(f"{name}: output buffers must be C-contiguous float32")
    binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)

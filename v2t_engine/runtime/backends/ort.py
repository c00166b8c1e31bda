"""ONNX Runtime backend over an export directory.

Every graph runs through IOBinding over memory the caller owns: host numpy arrays on the CPU,
CuPy device arrays with ``--device cuda`` (``xp``), so the KV buffers of ``BoundSlotDecoder``
stay where the graphs run and only token ids cross to the host each step. On CUDA the decode
step is replayed as a CUDA graph, one per batch bucket (ORT's ``enable_cuda_graph`` with a
``gpu_graph_id`` per bucket): a bucket's views of the slot buffers start at the same addresses
every step, which is what a captured graph requires."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ...concurrency import available_cores
from ...errors import ArtifactError, ConfigError, MissingDependencyError
from ...tokenizer import CaptionTokenizer
from ..contract import (INPUT_IDS, LOGITS, POSITION_IDS, PREFIX_EMBEDS, GraphContract, cache_names,
                        decode_contract, encoder_contract, kv_out_names, prefill_contract)
from ..manifest import Manifest, is_export_dir

# ONNX element types as ORT reports them → numpy dtype names (the contract's spelling).
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16",
               "tensor(bfloat16)": "bfloat16", "tensor(int32)": "int32", "tensor(uint8)": "uint8"}


def session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One intra-op pool sized to the cores; inter-op parallelism buys nothing for these
    # sequential transformer graphs.
    opts.intra_op_num_threads = threads or available_cores()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def providers_for(device: str, cuda_graph: bool = False) -> list:
    """ORT's providers for `device`; `cuda_graph` asks the CUDA provider to capture and replay
    the session's runs (only for a graph whose every run binds fixed device buffers)."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ConfigError("--device cuda: this onnxruntime has no CUDAExecutionProvider "
                              f"(available: {', '.join(available)}); pip install 'v2t[gpu]'")
        cuda = ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}) if cuda_graph else "CUDAExecutionProvider"
        return [cuda, "CPUExecutionProvider"]
    raise ConfigError(f"unknown device {device!r}; use cpu or cuda")


def array_module(device: str):
    """Where `device`'s buffers live: numpy, or CuPy for CUDA (torch-free device arrays)."""
    if device == "cpu":
        return np
    try:
        import cupy
    except ImportError:
        raise MissingDependencyError("--device cuda keeps the KV cache on the GPU with CuPy, which is not "
                                     "installed: pip install 'v2t[gpu]'") from None
    return cupy


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
        opts = session_options(threads)
        self.xp, self.device = array_module(device), device
        self.batch_buckets = device == "cuda"  # one captured CUDA graph per decode batch size
        graphs = {name: self.export_dir / file for name, file in self.manifest.graph_files.items()}
        self.encoder, self.prefill_session, self.decode_session = (
            open_session(graphs[c.name], c, opts, providers_for(device, cuda_graph=c.name == "decode"))
            for c in (encoder_contract(cfg), prefill_contract(cfg), decode_contract(cfg)))
        (self._encoder_input,) = encoder_contract(cfg).input_names
        self._cache_names, self._kv_out_names = cache_names(cfg.n_layer), kv_out_names(cfg.n_layer)
        self._graph_ids: dict[int, ort.RunOptions] = {}
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
        if frames.dtype != np.uint8:
            raise TypeError(f"encode_frames takes uint8 crops, got {frames.dtype}")
        return self.encoder.run(None, {self._encoder_input: frames}, self._encoder_run)[0]

    def prefill(self, prefix, logits, kv_out) -> None:
        binding = self.prefill_session.io_binding()
        self._bind(binding.bind_input, PREFIX_EMBEDS, prefix)
        for name, array in ((LOGITS, logits), *zip(self._kv_out_names, kv_out)):
            self._bind(binding.bind_output, name, array)
        self._run(self.prefill_session, binding, None)

    def decode(self, input_ids, position_ids, cache, logits, kv_out) -> None:
        binding = self.decode_session.io_binding()
        for name, array in ((INPUT_IDS, input_ids), (POSITION_IDS, position_ids), *zip(self._cache_names, cache)):
            self._bind(binding.bind_input, name, array)
        for name, array in ((LOGITS, logits), *zip(self._kv_out_names, kv_out)):
            self._bind(binding.bind_output, name, array)
        self._run(self.decode_session, binding, self._graph_run(input_ids.shape[0]))

    def _bind(self, bind, name: str, array) -> None:
        """Bind the caller's memory by address: the graph reads and writes it in place."""
        if not array.flags.c_contiguous:
            raise ValueError(f"{name}: bound buffers must be C-contiguous")
        address = array.ctypes.data if self.xp is np else array.data.ptr
        bind(name, self.device, 0, array.dtype, list(array.shape), address)

    def _graph_run(self, batch: int) -> ort.RunOptions | None:
        """On CUDA, the run options that select batch size `batch`'s captured graph (ORT's ids
        start at 1)."""
        if self.device != "cuda":
            return None
        if batch not in self._graph_ids:
            run = ort.RunOptions()
            run.add_run_config_entry("gpu_graph_id", str(len(self._graph_ids) + 1))
            self._graph_ids[batch] = run
        return self._graph_ids[batch]

    def _run(self, session: ort.InferenceSession, binding: ort.IOBinding, run: ort.RunOptions | None) -> None:
        if self.xp is not np:
            # The buffers were written by CuPy on its stream; ORT runs on its own.
            self.xp.cuda.get_current_stream().synchronize()
        session.run_with_iobinding(binding, run)

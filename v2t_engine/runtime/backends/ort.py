"""ONNX Runtime backend over an export directory.

Every graph runs through IOBinding over memory the caller owns: host numpy arrays on the CPU,
CuPy device arrays with ``--device cuda`` (``xp``), so the KV buffers of ``BoundSlotDecoder``
stay where the graphs run and only token ids cross to the host each step. On CUDA the decode
step is replayed as a CUDA graph, one per batch bucket (ORT's ``enable_cuda_graph`` with a
``gpu_graph_id`` per bucket): a bucket's views of the slot buffers start at the same addresses
every step, which is what a captured graph requires.

``--device tensorrt`` runs the graphs with ONNX Runtime's TensorRT execution provider (CUDA for
what it does not take), which builds its own engines into ``ORT_CACHE_DIR`` of the export
directory, for the profiles of the export's engines where it has them (``tensorrt.ort_profiles``).
Buffers are CuPy device arrays as on cuda; decode runs without ORT's CUDA graphs, which the
CUDA provider can capture only when it runs every node."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ...concurrency import available_cores
from ...errors import ArtifactError, ConfigError, MissingDependencyError
from ...tokenizer import CaptionTokenizer
from ..contract import (CACHE_LEN, INPUT_IDS, LOGITS, POSITION_IDS, PREFIX_EMBEDS, GraphContract, cache_names,
                        decode_contract, encoder_contract, kv_out_names, prefill_contract)
from ..manifest import Manifest, is_export_dir
from ..tensorrt import ORT_CACHE_DIR, fixed_size, ort_profiles, ort_tensorrt_options

# ONNX element types as ORT reports them → numpy dtype names (the contract's spelling).
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16",
               "tensor(bfloat16)": "bfloat16", "tensor(int32)": "int32", "tensor(uint8)": "uint8"}


# Decode bindings kept: one per batch size a slot pool steps (a few powers of two, or up to the
# slot count on the CPU) for the pools alive at once; more means pools came and went.
_KEPT_BINDINGS = 256


def session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One intra-op pool sized to the cores; inter-op parallelism buys nothing for these
    # sequential transformer graphs.
    opts.intra_op_num_threads = threads or available_cores()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def providers_for(device: str, cuda_graph: bool = False, tensorrt_options: dict[str, str] | None = None) -> list:
    """ORT's providers for `device`; `cuda_graph` asks the CUDA provider to capture and replay
    the session's runs (only for a graph whose every run binds fixed device buffers);
    `tensorrt_options`: the TensorRT provider's options for this graph (``--device tensorrt``)."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ConfigError("--device cuda: this onnxruntime has no CUDAExecutionProvider "
                              f"(available: {', '.join(available)}); pip install 'v2t[gpu]'")
        cuda = ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}) if cuda_graph else "CUDAExecutionProvider"
        return [cuda, "CPUExecutionProvider"]
    if device == "tensorrt":
        if "TensorrtExecutionProvider" not in available:
            raise ConfigError("--device tensorrt: this onnxruntime has no TensorrtExecutionProvider "
                              f"(available: {', '.join(available)}); pip install 'v2t[gpu]' on a machine with "
                              "an NVIDIA GPU, or use --device cuda")
        return [("TensorrtExecutionProvider", tensorrt_options or {}), "CUDAExecutionProvider",
                "CPUExecutionProvider"]
    raise ConfigError(f"unknown device {device!r}; use cpu, cuda or tensorrt")


def array_module(device: str):
    """Where `device`'s buffers live: numpy, or CuPy for CUDA (torch-free device arrays)."""
    if device == "cpu":
        return np
    try:
        import cupy
    except ImportError:
        raise MissingDependencyError(f"--device {device} keeps the KV cache on the GPU with CuPy, which is not "
                                     "installed: pip install 'v2t[gpu]'") from None
    return cupy


def tensorrt_setup(manifest: Manifest, export_dir: Path) -> tuple[dict[str, dict[str, str]], int | None]:
    """For ``--device tensorrt``: the TensorRT provider's options of each graph, and the KV
    columns its decode profile fixes (``fixed_cache_len``). The provider keeps its engines and
    timing cache in ORT_CACHE_DIR of the export directory, which must be writable."""
    profiles = ort_profiles(manifest.config, manifest.tensorrt)
    cache_dir = export_dir / ORT_CACHE_DIR
    try:
        cache_dir.mkdir(exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--device tensorrt keeps ONNX Runtime's TensorRT engines in {cache_dir}, which "
                          f"cannot be made ({err.strerror}): make {export_dir} writable, or use --device cuda") from None
    options = {name: ort_tensorrt_options(profile, cache_dir) for name, profile in profiles.items()}
    return options, fixed_size(decode_contract(manifest.config), profiles["decode"], CACHE_LEN)


def check_tensorrt_provider(session: ort.InferenceSession, path: Path) -> None:
    """ConfigError where ONNX Runtime could not start its TensorRT provider for `path` (TensorRT's
    libraries missing, say): it then falls back to CUDA with a printed warning, which
    ``--device tensorrt`` must not do silently."""
    if "TensorrtExecutionProvider" not in session.get_providers():
        raise ConfigError(f"{path}: ONNX Runtime could not start its TensorRT provider (its output above "
                          "says why; TensorRT's libraries come with pip install 'v2t[gpu]'): use --device cuda")


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
    devices = ("cpu", "cuda", "tensorrt")  # tensorrt: ONNX Runtime's TensorRT execution provider

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
        trt_options, self.fixed_cache_len = (tensorrt_setup(self.manifest, self.export_dir) if device == "tensorrt"
                                             else ({}, None))
        graphs = {name: self.export_dir / file for name, file in self.manifest.graph_files.items()}
        contracts = (encoder_contract(cfg), prefill_contract(cfg), decode_contract(cfg))
        self.encoder, self.prefill_session, self.decode_session = sessions = [
            open_session(graphs[c.name], c, opts, providers_for(device, cuda_graph=c.name == "decode",
                                                                  tensorrt_options=trt_options.get(c.name)))
            for c in contracts]
        if device == "tensorrt":
            for c, session in zip(contracts, sessions):
                check_tensorrt_provider(session, graphs[c.name])
        (self._encoder_input,) = encoder_contract(cfg).input_names
        self._cache_names, self._kv_out_names = cache_names(cfg.n_layer), kv_out_names(cfg.n_layer)
        self._graph_ids: dict[int, ort.RunOptions] = {}
        self._decode_bindings: dict[tuple, tuple] = {}
        # The encoder runs on however many videos the generator is refilling, and ORT's arena
        # keeps every chunk it ever grew for those shapes, so the peak RSS of `v2t predict` grew
        # with the length of the table (README, "Full-size results"). Shrinking the arena after
        # each encoder run hands the chunks back, which costs little beside a ViT forward; the
        # decoder's arena is left alone, its per-token runs are where allocation speed matters.
        self._encoder_run = ort.RunOptions()
        self._encoder_run.add_run_config_entry("memory.enable_memory_arena_shrinkage",
                                               "cpu:0" if device == "cpu" else "cpu:0;gpu:0")

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
        # BoundSlotDecoder passes the same objects over the same memory at every step of a batch
        # size, so their binding is made once: binding 50 buffers cost as much as a tiny model's
        # step. The entry holds the arguments, so no other object can take their ids meanwhile.
        args = (input_ids, position_ids, cache, logits, kv_out)
        key = tuple(map(id, args))
        if key not in self._decode_bindings:
            binding = self.decode_session.io_binding()
            inputs = ((INPUT_IDS, input_ids), (POSITION_IDS, position_ids), *zip(self._cache_names, cache))
            for name, array in inputs:
                self._bind(binding.bind_input, name, array)
            for name, array in ((LOGITS, logits), *zip(self._kv_out_names, kv_out)):
                self._bind(binding.bind_output, name, array)
            if len(self._decode_bindings) >= _KEPT_BINDINGS:
                self._decode_bindings.clear()
            self._decode_bindings[key] = (binding, args)
        self._run(self.decode_session, self._decode_bindings[key][0], self._graph_run(input_ids.shape[0]))

    def _bind(self, bind, name: str, array) -> None:
        """Bind the caller's memory by address: the graph reads and writes it in place."""
        if not array.flags.c_contiguous:
            raise ValueError(f"{name}: bound buffers must be C-contiguous")
        address = array.ctypes.data if self.xp is np else array.data.ptr
        bind(name, "cpu" if self.xp is np else "cuda", 0, array.dtype, list(array.shape), address)

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

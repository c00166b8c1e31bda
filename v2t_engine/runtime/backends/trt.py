"""TensorRT backend over an export directory that holds engines (``v2t export --format trt``).

Torch-free: device buffers and the stream come from CuPy, and TensorRT reads and writes them by
address (``set_tensor_address`` + ``execute_async_v3``; NVIDIA/TensorRT samples/python/
common_runtime.py). ``xp`` is ``cupy``, so ``slot_decoder.BoundSlotDecoder`` keeps the KV buffers
on the device and hands ``prefill`` and ``decode`` views of them; only token ids (or the logits a
search asks for) cross to the host.

Decode steps replay a CUDA graph per batch bucket (``batch_buckets``): a graph fixes the input
shapes, the tensor addresses and the execution context, so each bucket has its own context, is
run once eagerly after its shapes are set (TensorRT finishes its shape-dependent setup in the
first enqueue) and then captured on a non-default stream (cupy.cuda.Stream.begin_capture /
end_capture; the requirements as tensoracle's 1.1.0 notes list them for TensorRT capture). The
slot decoder's buffers keep their addresses for the whole job, so each bucket is captured once.

Every check that can refuse the directory runs before TensorRT deserializes anything: the
TensorRT version and the GPU the engines were built for, and the graphs they were built from.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ...errors import ArtifactError, ConfigError, V2TError
from ...tokenizer import CaptionTokenizer
from ..contract import (CACHE_LEN, FRAME_EMBEDS, FRAMES, INPUT_IDS, LOGITS, MANIFEST_FILE, NUM_FRAMES,
                        POSITION_IDS, PREFIX_EMBEDS, GraphContract, cache_names, graph_contracts, kv_out_names)
from ..manifest import Manifest
from ..tensorrt import (ALIGNMENT, MANIFEST_KEY, Profile, TensorRTBlock, check_compatible, check_sources,
                        current_gpu, file_sha256, fixed_size, import_cupy, import_tensorrt, outside_profile,
                        rebuild_command)

log = logging.getLogger(__name__)

NEEDED_FOR = "the trt backend"


class _Preflight(NamedTuple):
    manifest: Manifest
    block: TensorRTBlock
    trt: Any
    cupy: Any
    rebuild: str


def _preflight(export_dir: Path, device: str, precision: str | None, verify: bool) -> _Preflight:
    """Everything that can refuse `export_dir` on this machine, cheapest first, each a one-line
    V2TError naming the reason and what to do instead."""
    alternative = f"run the ONNX graphs in {export_dir} with --backend ort"
    if device != "cuda":
        raise ConfigError(f"{NEEDED_FOR} runs TensorRT engines on an NVIDIA GPU: use --device cuda, "
                          f"or --backend ort --device {device}")
    # Format, contract and the sizes of every listed file, engines included; their digests (with
    # `verify`) only after the checks below, which say more precisely why an engine cannot run.
    manifest = Manifest.load(export_dir)
    block = manifest.tensorrt
    if block is None:
        raise ArtifactError(f"{export_dir} holds no TensorRT engines: build them with "
                            f"`v2t export --format trt`, or {alternative}")
    if precision not in (None, block.precision):
        raise ConfigError(f"{export_dir}'s engines compute in {block.precision}, fixed when they were built: "
                          f"export again with --precision {precision}")
    trt = import_tensorrt(NEEDED_FOR, alternative)
    cupy = import_cupy(NEEDED_FOR, alternative)
    rebuild = rebuild_command(export_dir, manifest.source, block.precision)
    check_compatible(block, trt.__version__, current_gpu(cupy, NEEDED_FOR, alternative), rebuild, str(export_dir))
    check_sources(block, _source_digests(export_dir, block, manifest.files, verify), rebuild, str(export_dir))
    unlisted = sorted({c.name for c in graph_contracts(manifest.config)} - set(block.engines))
    if unlisted:
        raise ArtifactError(f"{export_dir / MANIFEST_FILE}: its {MANIFEST_KEY} block lists no engine for "
                            f"{', '.join(unlisted)}. Rebuild: {rebuild}")
    for graph, record in block.engines.items():
        if not (export_dir / record.engine).is_file():  # one the manifest's files do not list
            raise ArtifactError(f"{export_dir / record.engine}, the {graph} engine, is missing. Rebuild: {rebuild}")
    if verify:
        manifest.check_files(export_dir, verify=True)
    return _Preflight(manifest, block, trt, cupy, rebuild)


def _source_digests(export_dir: Path, block: TensorRTBlock, files: dict, verify: bool) -> dict[str, str | None]:
    """SHA-256 of each graph the engines were built from: as the manifest records it (the export
    rewrote that record if it rewrote the graph), or computed where it records none or `verify`
    asks for the files' own."""
    digests: dict[str, str | None] = {}
    for record in block.engines.values():
        for name in record.sources:
            recorded = files.get(name, {}).get("sha256")
            if recorded and not verify:
                digests[name] = recorded
            else:
                digests[name] = file_sha256(export_dir / name) if (export_dir / name).is_file() else None
    return digests


def _dtype_names(trt) -> dict:
    """TensorRT's data types as numpy spells them (the contract's spelling)."""
    t = trt.DataType
    return {t.FLOAT: "float32", t.HALF: "float16", t.BF16: "bfloat16", t.INT32: "int32", t.INT64: "int64",
            t.UINT8: "uint8"}


class _Engine:
    """One deserialized engine, checked against its graph's contract, and the aligned staging
    buffers for the tensors TensorRT cannot take where the caller holds them."""

    def __init__(self, trt, cupy, runtime, path: Path, contract: GraphContract, profile: Profile, rebuild: str):
        self.cupy, self.contract, self.profile, self.where = cupy, contract, profile, str(path)
        self.rebuild = rebuild
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{path}: TensorRT could not deserialize this engine (its log above says why). "
                                f"Rebuild: {rebuild}")
        names, modes = _dtype_names(trt), trt.TensorIOMode

        def declared(mode):
            tensors = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            return [(n, names.get(self.engine.get_tensor_dtype(n), str(self.engine.get_tensor_dtype(n))),
                     [None if d < 0 else d for d in self.engine.get_tensor_shape(n)])
                    for n in tensors if self.engine.get_tensor_mode(n) == mode]

        contract.check(declared(modes.INPUT), declared(modes.OUTPUT), self.where)
        # The largest size of each symbolic axis, from the profile: sizes the staging buffers.
        self.max_sizes = {axis: profile[spec.name].max[i] for spec in contract.inputs
                          for i, axis in spec.dynamic_axes().items()}
        self.dtypes = {t.name: np.dtype(t.dtype) for t in (*contract.inputs, *contract.outputs)}
        self.staging: dict[str, Any] = {}

    def context(self, stream):
        context = self.engine.create_execution_context()
        if context is None:
            raise MemoryError(f"{self.where}: TensorRT could not create an execution context (out of GPU memory?)")
        context.set_optimization_profile_async(0, stream.ptr)  # the engine's one profile
        return context

    def check(self, inputs: Sequence[tuple[str, Any]], outputs: Sequence[tuple[str, Any]]) -> None:
        """ConfigError for an input outside the engine's profile (it was built for smaller batches
        or another frame count), ValueError for arrays that do not fit the contract."""
        sizes = {}
        for name, array in inputs:
            spec = next(t for t in self.contract.inputs if t.name == name)
            if array.dtype != self.dtypes[name]:
                raise ValueError(f"{self.where}: {name} must be {self.dtypes[name]}, got {array.dtype}")
            why = outside_profile(spec, self.profile[name], tuple(array.shape), self.rebuild, self.where)
            if why:
                raise ConfigError(why)
            sizes.update({axis: array.shape[i] for i, axis in spec.dynamic_axes().items()})
        for name, array in outputs:
            spec = next(t for t in self.contract.outputs if t.name == name)
            want = tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)
            if tuple(array.shape) != want or array.dtype != self.dtypes[name]:
                raise ValueError(f"{self.where}: output {name} must be {self.dtypes[name]} {want}, "
                                 f"got {array.dtype} {tuple(array.shape)}")

    def stage(self, inputs, outputs) -> tuple[list, list]:
        """Check the arrays, then pair each name with what TensorRT will address: the array, or
        its staging view (inputs copied in; outputs copied back by `unstage` after the run)."""
        self.check(inputs, outputs)
        return ([(n, self.staged(n, a, copy_in=True)) for n, a in inputs],
                [(n, self.staged(n, a, copy_in=False)) for n, a in outputs])

    @staticmethod
    def unstage(outputs, bound_outputs) -> None:
        for (_, dst), (_, src) in zip(outputs, bound_outputs):
            if src is not dst:
                dst[...] = src

    def staged(self, name: str, array, copy_in: bool):
        """`array` where TensorRT can address it (C-contiguous and 256-byte aligned), else this
        tensor's own staging view of the same shape (filled from `array` when `copy_in`). One
        buffer per tensor at the profile's largest shape, kept for good: a captured CUDA graph
        keeps reading and writing its address. A buffer's start is aligned: CuPy's pool splits
        cudaMalloc's (256-byte aligned) allocations at multiples of 512 bytes."""
        if array.flags.c_contiguous and array.data.ptr % ALIGNMENT == 0:
            return array
        spec = next(t for t in (*self.contract.inputs, *self.contract.outputs) if t.name == name)
        if name not in self.staging:
            largest = math.prod(self.max_sizes[d] if isinstance(d, str) else d for d in spec.shape)
            self.staging[name] = self.cupy.empty(largest, self.dtypes[name])
        view = self.staging[name][:math.prod(array.shape)].reshape(array.shape)
        if copy_in:
            view[...] = array
        return view

    def bind(self, context, inputs, outputs) -> None:
        for name, array in inputs:
            if not context.set_input_shape(name, tuple(array.shape)):
                raise RuntimeError(f"{self.where}: TensorRT refused the shape {tuple(array.shape)} of {name}")
            context.set_tensor_address(name, array.data.ptr)
        for name, array in outputs:
            context.set_tensor_address(name, array.data.ptr)

    def execute(self, context, stream) -> None:
        if not context.execute_async_v3(stream.ptr):
            raise RuntimeError(f"{self.where}: TensorRT could not enqueue the engine (its log above says why)")


class _Graph(NamedTuple):
    addresses: tuple[int, ...]
    context: Any
    graph: Any  # cupy.cuda.Graph


class TrtBackend:
    name = "trt"
    loads = ("an export directory with TensorRT engines (`v2t export --format trt`) built by this machine's "
             "TensorRT for its GPU")
    devices = ("cuda",)  # `auto` passes it over on any other device
    explains_refusals = True  # `--backend trt` gets _preflight's reason, not only `loads`

    def __init__(self, export_dir: str | Path, device: str = "cuda", threads: int | None = None,
                 verify: bool = False, precision: str | None = None, cuda_graphs: bool = True):
        """`threads` is unused: the engines run on the GPU. `cuda_graphs`: replay a captured graph
        per batch bucket in decode (False runs every step eagerly; tests compare the two)."""
        self.export_dir = Path(export_dir)
        pre = _preflight(self.export_dir, device, precision, verify)
        self.manifest, self.block, self.cupy, self.xp = pre.manifest, pre.block, pre.cupy, pre.cupy
        self.config = cfg = pre.manifest.config
        self.precision = pre.block.precision
        self.tokenizer = CaptionTokenizer.from_dir(self.export_dir / pre.manifest.tokenizer_file)
        self.cuda_graphs = cuda_graphs
        self.stream = pre.cupy.cuda.Stream(non_blocking=True)  # capture needs a non-default stream
        self._runtime = pre.trt.Runtime(pre.trt.Logger(pre.trt.Logger.WARNING))
        encoder, prefill, decode = (
            _Engine(pre.trt, pre.cupy, self._runtime, self.export_dir / pre.block.engines[c.name].engine, c,
                    pre.block.engines[c.name].profile, pre.rebuild) for c in graph_contracts(cfg))
        self.encoder, self.prefill_engine, self.decode_engine = encoder, prefill, decode
        self._encoder_context, self._prefill_context = encoder.context(self.stream), prefill.context(self.stream)
        self._decode_context = None  # the eager decode's, made on first use: graphs bring their own
        self._max_frames = encoder.max_sizes[NUM_FRAMES]
        # The decode engine's KV columns, which BoundSlotDecoder allocates instead of what a job's
        # caption length needs (and refuses a job that needs more).
        self.fixed_cache_len = fixed_size(decode.contract, decode.profile, CACHE_LEN)
        self._cache_names, self._kv_names = cache_names(cfg.n_layer), kv_out_names(cfg.n_layer)
        self._graphs: dict[int, _Graph] = {}

    @classmethod
    def accepts(cls, path: Path) -> bool:
        """The directory holds engines this machine can run: TensorRT and CuPy installed, a GPU,
        the TensorRT version and GPU the engines were built for, and their graphs unchanged.
        Where it holds engines that cannot run here, the warning says why (`auto` then runs its
        ONNX graphs)."""
        try:
            if Manifest.load(path).tensorrt is None:
                return False
        except V2TError:
            return False
        try:
            _preflight(Path(path), "cuda", None, verify=False)
        except V2TError as err:
            log.warning("not running the TensorRT engines in %s: %s", path, err)
            return False
        return True

    @property
    def batch_buckets(self) -> bool:
        """Decode batches are rounded up to a few bucket sizes: one captured graph each."""
        return self.cuda_graphs

    @contextlib.contextmanager
    def _on_stream(self):
        """Run the block on the backend's stream, after what the caller queued on its current
        stream (the slot decoder's writes into the KV buffers) and before what it queues next.
        Events order the two streams without a host sync."""
        caller = self.cupy.cuda.get_current_stream()
        self.stream.wait_event(caller.record())
        with self.stream:
            yield
        caller.wait_event(self.stream.record())

    def _run(self, engine: _Engine, context, inputs, outputs) -> None:
        """One eager run: check and stage the arrays, bind them, enqueue, copy staged outputs back."""
        bound_in, bound_out = engine.stage(inputs, outputs)
        engine.bind(context, bound_in, bound_out)
        engine.execute(context, self.stream)
        engine.unstage(outputs, bound_out)

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 crops (N, 3, S, S) → (N, E) float32 on the host; the encoder engine normalizes
        (its graph's first op). Runs in chunks of the profile's largest frame count."""
        frames = np.ascontiguousarray(frames)
        if frames.dtype != np.uint8:
            raise ValueError(f"{NEEDED_FOR} takes uint8 crops (preprocess.crop_frame), got {frames.dtype}")
        out = np.empty((len(frames), self.config.n_embd), np.float32)
        with self._on_stream():
            for start in range(0, len(frames), self._max_frames):
                chunk = self.cupy.asarray(frames[start:start + self._max_frames])
                emb = self.cupy.empty((len(chunk), self.config.n_embd), np.float32)
                self._run(self.encoder, self._encoder_context, [(FRAMES, chunk)], [(FRAME_EMBEDS, emb)])
                emb.get(out=out[start:start + len(chunk)])  # waits for the stream
        return out

    def prefill(self, prefix, logits, kv_out: Sequence) -> None:
        with self._on_stream():
            self._run(self.prefill_engine, self._prefill_context, [(PREFIX_EMBEDS, prefix)],
                      [(LOGITS, logits), *zip(self._kv_names, kv_out)])

    def decode(self, input_ids, position_ids, cache: Sequence, logits, kv_out: Sequence) -> None:
        inputs = [(INPUT_IDS, input_ids), (POSITION_IDS, position_ids), *zip(self._cache_names, cache)]
        outputs = [(LOGITS, logits), *zip(self._kv_names, kv_out)]
        with self._on_stream():
            if self.cuda_graphs:
                self._replay(inputs, outputs)
            else:
                if self._decode_context is None:
                    self._decode_context = self.decode_engine.context(self.stream)
                self._run(self.decode_engine, self._decode_context, inputs, outputs)

    def _replay(self, inputs, outputs) -> None:
        """Launch the decode graph of this batch size, capturing it first where there is none for
        these addresses (the first step of a bucket, or buffers that moved)."""
        engine = self.decode_engine
        bound_in, bound_out = engine.stage(inputs, outputs)
        addresses = tuple(a.data.ptr for _, a in (*bound_in, *bound_out))
        batch = inputs[0][1].shape[0]
        entry = self._graphs.get(batch)
        if entry is None or entry.addresses != addresses:
            context = entry.context if entry is not None else engine.context(self.stream)
            engine.bind(context, bound_in, bound_out)
            engine.execute(context, self.stream)  # once after the shapes change, before the capture
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                engine.execute(context, self.stream)
            finally:
                graph = self.stream.end_capture()
            entry = self._graphs[batch] = _Graph(addresses, context, graph)
        entry.graph.launch(stream=self.stream)
        engine.unstage(outputs, bound_out)

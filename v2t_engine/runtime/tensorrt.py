"""What v2t knows about TensorRT without importing it: optimization profiles derived from the graph
contract, the manifest's TensorRT block, the checks that refuse engines this machine cannot run,
and ONNX Runtime's TensorRT execution-provider options.

Engines are built by ``v2t export --format trt`` (export/trt.py) and run by the ``trt``
backend (``backends/trt.py``); both import ``tensorrt`` and ``cupy`` lazily, through the
``import_*`` functions here, so that a machine without them gets one line naming what is missing
and the alternative, never a traceback from deep inside an import.

Profiles. Each graph is its own engine with one optimization profile, so prefill and decode never
share one: a single profile spanning both phases makes TensorRT pick kernels that suit neither
(NVIDIA/TensorRT issues 2115, 1807: a separate decode profile gave 1.29x per token;
../shared/GPU-NOTES.md, "What users hit"). Within a profile only one axis is dynamic: batch for
prefill and decode, the frame count for the encoder. ``prefix_len`` (frames per video) and
``cache_len`` (columns of the KV buffer) are fixed at min = opt = max, since "Myelin graph with
multiple dynamic values may have poor performance" (same source) and the runtime never changes
them within a job.
"""
from __future__ import annotations

import hashlib
import importlib
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..config import ModelConfig
from ..errors import ArtifactError, ConfigError, MissingDependencyError
from .contract import BATCH, CACHE_LEN, NUM_FRAMES, PREFIX_LEN, GraphContract, TensorSpec, cache_len, graph_contracts

# The manifest's key for the block below.
MANIFEST_KEY = "tensorrt"
# Precisions an engine can be built from: the precision is in the ONNX graphs (TensorRT 11 has no
# fp16/bf16 builder flags), and v2t's int8 exports use ONNX Runtime's dynamic quantization
# (MatMulInteger), which TensorRT does not run: it wants explicit Q/DQ nodes.
TRT_PRECISIONS = ("fp32", "fp16", "bf16")
ENGINE_SUFFIX = ".plan"
TIMING_CACHE_FILE = "tensorrt_timing.cache"  # beside the engines, reused when they are rebuilt
ORT_CACHE_DIR = "ort_tensorrt_cache"  # ONNX Runtime's TensorRT provider keeps its own engines here
GPU_INSTALL = "pip install 'v2t[gpu]' on a machine with an NVIDIA GPU"
# The most decoder rows an engine takes at once when its builder says nothing else: the slots of a
# GPU job (README, "GPU": predict --micro_batch_size 256), with room for 4 beams at 64 videos.
DEFAULT_MAX_BATCH = 256
CUPY_INSTALL = "pip install cupy-cuda12x (or cupy-cuda13x, matching the machine's CUDA)"
# TensorRT rejects I/O addresses that are not 256-byte aligned (NvInferRuntime.h, setTensorAddress).
ALIGNMENT = 256

Shape = tuple[int, ...]


class ShapeRange(NamedTuple):
    """One input's shapes in an optimization profile: TensorRT's kernels are tuned for `opt` and
    run any shape between `min` and `max`, axis by axis."""
    min: Shape
    opt: Shape
    max: Shape

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShapeRange":
        return cls(*(tuple(int(d) for d in data[k]) for k in ("min", "opt", "max")))

    def holds(self, shape: Shape) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max))

    @property
    def static(self) -> bool:
        return self.min == self.max


Profile = dict[str, ShapeRange]  # input name → its shapes, for every input of one graph


# ------------------------------------------------------------------------------------- profiles
def check_bounds(bounds: Mapping[str, tuple[int, int, int]]) -> None:
    """ConfigError naming the first axis whose (min, opt, max) are not integers with
    0 <= min <= opt <= max (zero-length dims are legal in TensorRT since 8)."""
    for axis, triple in bounds.items():
        if len(triple) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in triple):
            raise ConfigError(f"profile bounds of axis {axis!r} must be three integers (min, opt, max), got {triple!r}")
        lo, opt, hi = triple
        if not 0 <= lo <= opt <= hi:
            raise ConfigError(f"profile bounds of axis {axis!r} must satisfy 0 <= min <= opt <= max, "
                              f"got min {lo}, opt {opt}, max {hi}")


def profile_shapes(contract: GraphContract, bounds: Mapping[str, tuple[int, int, int]]) -> Profile:
    """(min, opt, max) shapes of every input of `contract`: its fixed sizes as they are, each
    symbolic axis from `bounds` {axis name: (min, opt, max)}. ConfigError for bad bounds or a
    dynamic axis without them."""
    check_bounds(bounds)
    profile = {}
    for spec in contract.inputs:
        missing = [axis for axis in spec.dynamic_axes().values() if axis not in bounds]
        if missing:
            raise ConfigError(f"{contract.name} input {spec.name!r} has the dynamic axis {missing[0]!r}, "
                              f"which has no profile bounds (given: {', '.join(sorted(bounds)) or 'none'})")
        profile[spec.name] = ShapeRange(*(tuple(bounds[d][k] if isinstance(d, str) else d for d in spec.shape)
                                          for k in range(3)))
    return profile


def default_bounds(cfg: ModelConfig, max_batch: int, max_frames: int, opt_batch: int | None = None,
                   opt_frames: int | None = None) -> dict[str, tuple[int, int, int]]:
    """The profile bounds v2t builds with. Batch runs 1..max_batch (the generator's slots: a decode
    steps at most every slot, a prefill refills at most every slot); frames 1..max_frames (the
    encoder gets every frame of the videos a refill brings). opt defaults to the max, the steady
    state of a long job whose slots are full. prefix_len and cache_len are fixed (module docstring):
    the runtime always prefills cfg.frame_num frames into a cache of cache_len(cfg) columns."""
    opt_batch = max_batch if opt_batch is None else opt_batch
    opt_frames = max_frames if opt_frames is None else opt_frames
    if max_batch < 1 or max_frames < 1:
        raise ConfigError(f"the largest batch and frame count of a TensorRT profile must be at least 1, "
                          f"got max_batch {max_batch}, max_frames {max_frames}")
    bounds = {BATCH: (1, opt_batch, max_batch), NUM_FRAMES: (1, opt_frames, max_frames),
              PREFIX_LEN: (cfg.frame_num,) * 3, CACHE_LEN: (cache_len(cfg),) * 3}
    check_bounds(bounds)
    return bounds


# Why a profile fixes an axis (default_bounds), for the message when a job asks for another size.
_FIXED_BECAUSE = {PREFIX_LEN: "the model's frame_num frames per video",
                  CACHE_LEN: "frame_num + text_len columns, for captions of up to text_len tokens"}


def outside_profile(spec: TensorSpec, shape_range: ShapeRange, shape: Shape, rebuild: str, where: str) -> str | None:
    """None when input `spec` of `shape` fits its profile `shape_range`, else why not and what to
    do: fewer rows or engines built for more, or the sizes the engine fixes."""
    if shape_range.holds(shape):
        return None
    head = (f"{where}: {spec.name} of shape {shape} is outside the engine's profile "
            f"(min {shape_range.min}, max {shape_range.max})")
    if len(shape) != len(shape_range.min):
        return head
    for axis, (got, lo, hi) in enumerate(zip(shape, shape_range.min, shape_range.max)):
        name = spec.shape[axis]
        if lo <= got <= hi:
            continue
        if lo == hi and isinstance(name, str):
            return (f"{head}: its {name} is fixed at {lo}, {_FIXED_BECAUSE.get(name, 'as the runtime uses it')}, "
                    f"and here it is {got}")
        return (f"{head}: the engine was built for {name} {lo} to {hi}, and here it is {got}; run fewer rows "
                f"at once (--micro_batch_size), or rebuild the engines for more: {rebuild}")
    return head


def graph_profiles(cfg: ModelConfig, bounds: Mapping[str, tuple[int, int, int]]) -> dict[str, Profile]:
    """One profile per graph (module docstring: one engine and one profile per phase)."""
    return {contract.name: profile_shapes(contract, bounds) for contract in graph_contracts(cfg)}


def fixed_size(contract: GraphContract, profile: Profile, axis: str) -> int | None:
    """The size `profile` fixes symbolic `axis` at (min = max) in the inputs of `contract` that
    have it, or None where the profile lets it vary (or no input has it)."""
    sizes = set()
    for spec in contract.inputs:
        r = profile[spec.name]
        sizes |= {(r.min[i], r.max[i]) for i, name in spec.dynamic_axes().items() if name == axis}
    if len(sizes) != 1:
        return None
    ((lo, hi),) = sizes
    return lo if lo == hi else None


def engine_files(graph_files: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """graph name → (the ONNX graph an engine is built from, the engine's file), from the
    manifest's graph name → ONNX file: ``frame_encoder.onnx`` → ``frame_encoder.plan``."""
    return {name: (onnx, Path(onnx).stem + ENGINE_SUFFIX) for name, onnx in graph_files.items()}


# --------------------------------------------------------------------------- the manifest block
@dataclass(frozen=True)
class EngineRecord:
    engine: str  # the engine file, in the export directory
    sources: dict[str, str]  # the ONNX graph (and weight side file) it was built from → SHA-256
    profile: Profile

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "sources": dict(self.sources),
                "profile": {name: r.to_dict() for name, r in self.profile.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EngineRecord":
        return cls(engine=str(data["engine"]), sources={str(k): str(v) for k, v in data["sources"].items()},
                   profile={str(k): ShapeRange.from_dict(v) for k, v in data["profile"].items()})


@dataclass(frozen=True)
class TensorRTBlock:
    """The manifest's record of the engines in an export directory: what built them, for which
    GPU, from which graphs, for which shapes."""
    tensorrt_version: str  # tensorrt.__version__ of the builder; an engine runs only under it
    gpu_name: str  # cudaDeviceProp.name of the GPU it was built on
    compute_capability: str  # "9.0"
    precision: str  # of the ONNX graphs, which carry it into the engines (strongly typed)
    engines: dict[str, EngineRecord] = field(default_factory=dict)  # by graph name

    def to_dict(self) -> dict[str, Any]:
        return {"tensorrt_version": self.tensorrt_version, "gpu_name": self.gpu_name,
                "compute_capability": self.compute_capability, "precision": self.precision,
                "timing_cache": TIMING_CACHE_FILE,
                "engines": {name: record.to_dict() for name, record in self.engines.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest.json") -> "TensorRTBlock":
        try:
            return cls(tensorrt_version=str(data["tensorrt_version"]), gpu_name=str(data["gpu_name"]),
                       compute_capability=str(data["compute_capability"]), precision=str(data["precision"]),
                       engines={str(k): EngineRecord.from_dict(v) for k, v in data["engines"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ArtifactError(f"{where}: the {MANIFEST_KEY} block is malformed ({type(err).__name__}: {err}); "
                                "rebuild the engines with `v2t export --format trt`") from None


# ---------------------------------------------------------------------------------- the checks
@dataclass(frozen=True)
class GpuIdentity:
    name: str
    compute_capability: str  # "major.minor"


def rebuild_command(export_dir: str | Path, checkpoint: str | Path | None, precision: str) -> str:
    """The command that rebuilds an export directory's engines on this machine."""
    ck = shlex.quote(str(checkpoint)) if checkpoint else "CK"
    return (f"v2t export --checkpoint_dir {ck} --format trt --output {shlex.quote(str(export_dir))} "
            f"--precision {precision}")


def check_compatible(block: TensorRTBlock, tensorrt_version: str, gpu: GpuIdentity, rebuild: str,
                     where: str) -> None:
    """ArtifactError naming the mismatch and the rebuild command when the engines were built by
    another TensorRT or for another GPU: said here, before TensorRT tries to deserialize them."""
    if block.tensorrt_version != tensorrt_version:
        reason = (f"were built with TensorRT {block.tensorrt_version} and this machine has TensorRT "
                  f"{tensorrt_version}; an engine runs only under the TensorRT version that built it")
    elif block.compute_capability != gpu.compute_capability:
        reason = (f"were built for compute capability {block.compute_capability} ({block.gpu_name}) and this "
                  f"GPU has {gpu.compute_capability} ({gpu.name}); an engine runs only on the GPU it was built for")
    elif block.gpu_name != gpu.name:
        reason = (f"were built on a {block.gpu_name} and this GPU is a {gpu.name}; TensorRT tunes an engine's "
                  "kernels to the GPU model it was built on")
    else:
        return
    raise ArtifactError(f"{where}: its TensorRT engines {reason}. Rebuild them here: {rebuild} "
                        "(or run the ONNX graphs in the same directory with --backend ort)")


def check_sources(block: TensorRTBlock, digests: Mapping[str, str | None], rebuild: str, where: str) -> None:
    """ArtifactError when a graph an engine was built from has changed or is gone: the engine no
    longer computes what the graphs beside it do. `digests`: file name → SHA-256 now (None when
    the file is missing)."""
    for graph, record in block.engines.items():
        for source, built_from in record.sources.items():
            now = digests.get(source)
            if now != built_from:
                what = "is missing" if now is None else f"has changed (SHA-256 {now[:12]}…, built from {built_from[:12]}…)"
                raise ArtifactError(f"{where}: {source}, which the {graph} engine {record.engine} was built from, "
                                    f"{what}. Rebuild the engines: {rebuild}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------ ONNX Runtime's TRT provider
def ort_tensorrt_options(profile: Profile, cache_dir: str | Path) -> dict[str, str]:
    """Provider options of ``TensorrtExecutionProvider`` for one graph (onnxruntime.ai,
    TensorRT-ExecutionProvider; include/onnxruntime/core/providers/tensorrt/
    tensorrt_provider_options.h). The profile covers every input that has a dynamic axis, as the
    provider requires once any is given.

    trt_fp16_enable stays off (and trt_bf16_enable unset, off by default and unknown to older
    releases) whatever the export's precision: the precision is in the ONNX graphs, and ONNX
    Runtime builds a strongly typed network, which obeys it, only while neither fp16 nor int8 is
    enabled (tensorrt_execution_provider.cc, see microsoft/onnxruntime PR 24298). Enabling fp16
    would let TensorRT compute the LayerNorms, softmax and head that export/half.py keeps in fp32
    in half precision, where they overflow. CUDA graphs need fixed shapes, so they are on only for
    a profile without a dynamic axis."""
    dynamic = {name: r for name, r in profile.items() if not r.static}

    def shapes(k: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in r[k])}" for name, r in dynamic.items())

    cache_dir = str(cache_dir)
    options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache_dir,
               "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache_dir,
               "trt_fp16_enable": "False",
               "trt_cuda_graph_enable": str(not dynamic)}
    if dynamic:
        options.update(trt_profile_min_shapes=shapes(0), trt_profile_opt_shapes=shapes(1),
                       trt_profile_max_shapes=shapes(2))
    return options


def ort_profiles(cfg: ModelConfig, block: TensorRTBlock | None) -> dict[str, Profile]:
    """The profiles ONNX Runtime's TensorRT provider builds each graph's engine for: those of the
    export's own engines where it has them (the same shapes, checked on the GPU when they were
    built), else v2t's default bounds for DEFAULT_MAX_BATCH rows."""
    if block is not None:
        return {name: record.profile for name, record in block.engines.items()}
    return graph_profiles(cfg, default_bounds(cfg, DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH * cfg.frame_num))


# ------------------------------------------------------------------ lazy imports and refusals
def import_tensorrt(needed_for: str, alternative: str):
    """The ``tensorrt`` module, or MissingDependencyError: one line naming what is missing and
    `alternative` (what to do on this machine instead)."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        raise MissingDependencyError(f"{needed_for} needs TensorRT and an NVIDIA GPU, and this machine has no "
                                     f"`tensorrt` module: {GPU_INSTALL}, or {alternative}") from None


def import_cupy(needed_for: str, alternative: str):
    """CuPy, which holds v2t's device buffers and streams for TensorRT (the runtime stays
    torch-free), or MissingDependencyError."""
    try:
        return importlib.import_module("cupy")
    except ImportError:
        raise MissingDependencyError(f"{needed_for} needs CuPy for its GPU buffers and streams, and this machine "
                                     f"has no `cupy` module: {CUPY_INSTALL}, or {alternative}") from None


def current_gpu(cupy, needed_for: str, alternative: str, device: int = 0) -> GpuIdentity:
    """Name and compute capability of CUDA device `device` (both from cudaDeviceProp, as the
    manifest records them), or ConfigError when CUDA sees no GPU."""
    runtime = cupy.cuda.runtime
    try:
        count = runtime.getDeviceCount()
    except runtime.CUDARuntimeError as err:  # no driver, or a driver too old for this CUDA
        count, why = 0, f"CUDA reports: {err}"
    else:
        why = "CUDA sees no device"
    if count <= device:
        raise ConfigError(f"{needed_for} needs an NVIDIA GPU, and this machine has none ({why}): "
                          f"run it on a machine with one, or {alternative}")
    props = runtime.getDeviceProperties(device)
    name = props["name"]
    return GpuIdentity(name.decode() if isinstance(name, bytes) else str(name), f"{props['major']}.{props['minor']}")

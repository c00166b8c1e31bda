"""`v2t export --format trt`: TensorRT engines from the ONNX graphs of an export directory.

One engine per graph (frame encoder, prefill, decode), each with the one optimization profile
``v2t_engine.runtime.tensorrt.graph_profiles`` derives from the contract. The network is strongly
typed on TensorRT 10 and 11 alike, so an engine computes in the precision the ONNX graph states
(export/half.py): TensorRT 11 removed the fp16/bf16 builder flags, and on TensorRT 10 the flag-free
strongly typed mode is the same single code path (../shared/GPU-NOTES.md, "TensorRT 11"). The
timing cache is kept beside the engines and fed back into the next build on this machine, which
then skips the kernel timings it already did.

TensorRT and CuPy are imported when a build starts, never at import: ``check_can_build`` says in
one line what is missing on a machine without them.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from v2t_engine.config import ModelConfig
from v2t_engine.errors import ArtifactError, ConfigError, V2TError
from v2t_engine.runtime.contract import MANIFEST_FILE, graph_contracts
from v2t_engine.runtime.tensorrt import (TIMING_CACHE_FILE, TRT_PRECISIONS, EngineRecord, Profile,
                                         TensorRTBlock, current_gpu, default_bounds, engine_files, file_sha256,
                                         graph_profiles, import_cupy, import_tensorrt)

log = logging.getLogger(__name__)

NEEDED_FOR = "--format trt"
ALTERNATIVE = "export --format onnx here and run it with ONNX Runtime"
# Scratch memory TensorRT may use while it times tactics; larger lets it try more of them.
DEFAULT_WORKSPACE = 8 << 30


class EngineBuildError(V2TError):
    """TensorRT could not parse a graph or build an engine from it."""


def check_trt_precision(precision: str) -> None:
    """ConfigError for a precision TensorRT engines cannot be built in: said before any work."""
    if precision not in TRT_PRECISIONS:
        raise ConfigError(f"--format trt builds {', '.join(TRT_PRECISIONS)} exports, not {precision}: v2t's int8 "
                          "precisions are ONNX Runtime's dynamic quantization, which TensorRT does not run "
                          "(it needs Q/DQ nodes); use --format onnx for them")


def check_can_build():
    """(tensorrt, this GPU), or the one-line refusal: no `tensorrt`, no CuPy, no GPU. Cheap enough
    to run before minutes of ONNX export."""
    trt = import_tensorrt(NEEDED_FOR, ALTERNATIVE)
    cupy = import_cupy(NEEDED_FOR, ALTERNATIVE)
    return trt, current_gpu(cupy, NEEDED_FOR, ALTERNATIVE)


def network_flags(trt) -> int:
    """create_network flags for a strongly typed network. TensorRT 10 has it as the opt-in
    STRONGLY_TYPED flag; 11 keeps the flag for compatibility but ignores it, every network being
    strongly typed (TensorRT 11.0 Python API, NetworkDefinitionCreationFlag), so a TensorRT 11 that
    drops it needs no flag. Older releases lack strong typing: they would silently run fp32 graphs'
    half-precision parts however they chose, so they are refused."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is not None:
        return 1 << int(flag)
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    raise EngineBuildError(f"TensorRT {trt.__version__} has no strongly typed networks, which v2t needs to keep "
                           f"the precision of its graphs; install TensorRT 10 or later: pip install 'v2t[gpu]'")


def build_engines(export_dir: str | Path, precision: str, max_batch: int, max_frames: int | None = None,
                  opt_batch: int | None = None, workspace_bytes: int = DEFAULT_WORKSPACE,
                  reuse_timing_cache: str | Path | None = None) -> TensorRTBlock:
    """Build the engines of every graph in `export_dir` (an ONNX export of `precision`) and return
    the manifest's TensorRT block; the caller writes it into the manifest. Engines take batches
    up to `max_batch` (the generator's slots) and up to `max_frames` frames per encoder call
    (default: a frame set for every slot). `reuse_timing_cache`: the timing cache of engines this
    build replaces (default: the one in `export_dir`, if any)."""
    check_trt_precision(precision)
    trt, gpu = check_can_build()
    export_dir = Path(export_dir)
    cfg, graph_files = _read_export(export_dir, precision)
    profiles = graph_profiles(cfg, default_bounds(cfg, max_batch, max_frames or max_batch * cfg.frame_num,
                                                  opt_batch))
    cache_path = export_dir / TIMING_CACHE_FILE
    previous = next((Path(p) for p in (reuse_timing_cache, cache_path) if p and Path(p).is_file()), None)
    timing = previous.read_bytes() if previous else b""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    records = {}
    for name, (onnx_file, engine_file) in engine_files(graph_files).items():
        log.info("building the TensorRT %s engine from %s", name, onnx_file)
        plan, timing = build_engine(trt, builder, logger, export_dir / onnx_file, profiles[name],
                                    workspace_bytes, timing, tf32=precision != "fp32")
        write_atomically(export_dir / engine_file, plan)
        sources = [n for n in (onnx_file, onnx_file + ".data") if (export_dir / n).is_file()]
        records[name] = EngineRecord(engine_file, {n: file_sha256(export_dir / n) for n in sources}, profiles[name])
    write_atomically(cache_path, timing)
    return TensorRTBlock(trt.__version__, gpu.name, gpu.compute_capability, precision, records)


def build_engine(trt, builder, logger, onnx_path: Path, profile: Profile, workspace_bytes: int,
                 timing: bytes, tf32: bool = True) -> tuple[object, bytes]:
    """(serialized engine, the timing cache afterwards) for the graph at `onnx_path`. `tf32`
    False keeps fp32 matmuls in fp32: TensorRT's TF32 flag, on by default, rounds their inputs to
    10-bit mantissas, and an fp32 export is validated to give PyTorch's greedy tokens exactly."""
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads a weight side file beside it too
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors or 'no error reported'}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(profile):
        raise ArtifactError(f"{onnx_path} has the inputs {sorted(inputs)}, the contract {sorted(profile)}: "
                            "re-export it with this v2t")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = _timing_cache(config, timing)
    shapes = builder.create_optimization_profile()
    for name, r in profile.items():
        shapes.set_shape(name, r.min, r.opt, r.max)
    if config.add_optimization_profile(shapes) < 0:
        raise EngineBuildError(f"TensorRT rejected the optimization profile of {onnx_path}: {profile}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path} (its log above says why); "
                               "--format onnx runs the same graph with ONNX Runtime")
    return plan, bytes(cache.serialize())


def _timing_cache(config, previous: bytes):
    """Set a timing cache on `config`, starting from `previous` where TensorRT accepts it; one
    made by another TensorRT version or GPU is refused by set_timing_cache (ignore_mismatch
    False, since its timings do not hold here), and the build starts an empty one."""
    cache = config.create_timing_cache(previous)
    if cache is not None and config.set_timing_cache(cache, False):
        return cache
    log.warning("the TensorRT timing cache is from another TensorRT version or GPU; starting a new one")
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    return cache


def _read_export(export_dir: Path, precision: str) -> tuple[ModelConfig, dict[str, str]]:
    """The model config of an ONNX export of `precision` and its graph name → ONNX file, from
    its manifest."""
    path = export_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        cfg, exported = ModelConfig.from_dict(data["model_config"]), data["precision"]
        graph_files = {c.name: data["graphs"][c.name]["file"] for c in graph_contracts(cfg)}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: not a readable v2t export manifest ({type(err).__name__}: {err}); "
                            "export with `v2t export --format onnx` first") from None
    if exported != precision:
        raise ConfigError(f"{export_dir} holds {exported} graphs, not {precision}: an engine's precision is its "
                          "graphs' (strongly typed), so export them in the precision wanted")
    missing = [name for name, file in graph_files.items() if not (export_dir / file).is_file()]
    if missing:
        raise ArtifactError(f"{export_dir} lacks the ONNX graph of {', '.join(missing)}; re-export it")
    return cfg, graph_files


def write_atomically(path: Path, data) -> None:
    """Write `data` (bytes, or TensorRT's IHostMemory) to `path` through a temporary file in the
    same directory: a crash mid-write never leaves a truncated engine under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

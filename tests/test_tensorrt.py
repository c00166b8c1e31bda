"""TensorRT (issue 16): everything that needs no TensorRT is checked on the CPU.

- Optimization profiles derived from the contract: every input of every graph, min <= opt <= max,
  fixed sizes fixed, bad bounds refused.
- The manifest's TensorRT block: round trip, and the refusals of engines built by another
  TensorRT, for another GPU, or from graphs that have changed since, each naming the command that
  rebuilds them.
- ONNX Runtime's TensorRT provider options.
- The wiring: the block in the manifest (engines and timing cache listed and size-checked), which
  backend `auto` picks for a directory with engines on cpu and on cuda, `--backend trt`'s own
  refusals, `--device tensorrt` (ONNX Runtime's provider), a decode graph of one cache length, and
  `v2t export --format trt` around stand-ins for the builder and the GPU validation.
- The one-line refusals of `build_engines` and `TrtBackend` where `tensorrt`, CuPy or a GPU is
  missing. Modules are made missing by putting None in sys.modules (then `import` fails), so the
  tests are real on a machine that has them too; where a test needs a TensorRT or CuPy to report
  a version or a GPU, a namespace standing in for the module does, and the test shows that the
  backend refuses before it would call anything else of it.

Tests marked gpu build engines from a real export and compare the TensorRT backend's captions with
ONNX Runtime's; they skip where TensorRT and a CUDA GPU are missing (every machine of this
project so far).
"""
import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from v2t_engine.config import ModelConfig
from v2t_engine.errors import ArtifactError, ConfigError, MissingDependencyError
from v2t_engine.runtime.contract import (BATCH, CACHE_LEN, DECODE_FILE, ENCODER_FILE, FRAMES, INPUT_IDS,
                                         MANIFEST_FILE, NUM_FRAMES, POSITION_IDS, PREFILL_FILE, PREFIX_EMBEDS,
                                         PREFIX_LEN, cache_len, cache_names, decode_contract, graph_contracts)
from v2t_engine.runtime.manifest import Manifest
from v2t_engine.runtime.tensorrt import (MANIFEST_KEY, TIMING_CACHE_FILE, EngineRecord, GpuIdentity, ShapeRange,
                                         TensorRTBlock, check_compatible, check_sources, default_bounds,
                                         engine_files, file_sha256, graph_profiles, ort_tensorrt_options,
                                         outside_profile, profile_shapes, rebuild_command)

CFG = ModelConfig(vocab_size=50, frame_num=2, img_size=32, text_len=8, n_layer=2, n_head=2, n_embd=16,
                  vit_width=16, vit_layers=1, vit_heads=2, vit_patch_size=16)
BOUNDS = default_bounds(CFG, max_batch=16, max_frames=32, opt_batch=8)
H100 = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")
TRT_VERSION = "10.9.0.34"
GRAPH_FILES = {"frame_encoder": ENCODER_FILE, "prefill": PREFILL_FILE, "decode": DECODE_FILE}
REBUILD = "v2t export --checkpoint_dir"


# ------------------------------------------------------------------------------------ profiles
def test_every_input_of_every_graph_gets_min_opt_max_shapes():
    profiles = graph_profiles(CFG, BOUNDS)
    assert list(profiles) == [c.name for c in graph_contracts(CFG)]
    for contract in graph_contracts(CFG):
        profile = profiles[contract.name]
        assert list(profile) == contract.input_names
        for spec in contract.inputs:
            r = profile[spec.name]
            assert len(r.min) == len(r.opt) == len(r.max) == len(spec.shape)
            assert all(lo <= opt <= hi for lo, opt, hi in zip(r.min, r.opt, r.max)), spec.name
            for axis, size in enumerate(spec.shape):
                got = (r.min[axis], r.opt[axis], r.max[axis])
                assert got == (BOUNDS[size] if isinstance(size, str) else (size,) * 3), (spec.name, axis)


def test_only_batch_and_frame_count_are_dynamic():
    """prefix_len and cache_len are fixed at the sizes the runtime uses: one dynamic axis per
    profile."""
    assert BOUNDS[PREFIX_LEN] == (CFG.frame_num,) * 3
    assert BOUNDS[CACHE_LEN] == (cache_len(CFG),) * 3 == (10,) * 3
    profiles = graph_profiles(CFG, BOUNDS)
    assert profiles["frame_encoder"][FRAMES] == ShapeRange((1, 3, 32, 32), (32, 3, 32, 32), (32, 3, 32, 32))
    assert profiles["prefill"][PREFIX_EMBEDS] == ShapeRange((1, 2, 16), (8, 2, 16), (16, 2, 16))
    cache = profiles["decode"][cache_names(CFG.n_layer)[0]]
    assert cache == ShapeRange((1, 2, 10, 8), (8, 2, 10, 8), (16, 2, 10, 8))
    assert profiles["decode"][INPUT_IDS] == profiles["decode"][POSITION_IDS] == ShapeRange((1, 1), (8, 1), (16, 1))
    # opt defaults to the max: a long job's pool is full.
    assert default_bounds(CFG, 64, 256)[BATCH] == (1, 64, 64)


ORDER = "0 <= min <= opt <= max"


@pytest.mark.parametrize("triple, why", [((2, 1, 4), ORDER), ((1, 5, 4), ORDER), ((-1, 0, 1), ORDER),
                                         ((1, 2), "three integers"), ((1.0, 2, 3), "three integers"),
                                         ((True, 2, 3), "three integers")])
def test_bad_bounds_are_refused_naming_the_axis(triple, why):
    with pytest.raises(ConfigError, match=f"axis '{BATCH}'") as err:
        profile_shapes(decode_contract(CFG), {**BOUNDS, BATCH: triple})
    assert why in str(err.value)


def test_a_dynamic_axis_without_bounds_is_refused():
    bounds = {k: v for k, v in BOUNDS.items() if k != CACHE_LEN}
    with pytest.raises(ConfigError, match=f"{cache_names(CFG.n_layer)[0]}.*{CACHE_LEN}"):
        profile_shapes(decode_contract(CFG), bounds)


@pytest.mark.parametrize("kwargs", [{"max_batch": 0, "max_frames": 4}, {"max_batch": 4, "max_frames": 0},
                                    {"max_batch": 4, "max_frames": 8, "opt_batch": 5},
                                    {"max_batch": 4, "max_frames": 8, "opt_frames": 0}])
def test_default_bounds_refuse_impossible_sizes(kwargs):
    with pytest.raises(ConfigError):
        default_bounds(CFG, **kwargs)


def test_engine_files_sit_beside_their_graphs():
    assert engine_files(GRAPH_FILES) == {"frame_encoder": (ENCODER_FILE, "frame_encoder.plan"),
                                         "prefill": (PREFILL_FILE, "prefill.plan"),
                                         "decode": (DECODE_FILE, "decode.plan")}


# --------------------------------------------------------------------------- manifest block
def block(sources=None, **changes) -> TensorRTBlock:
    profiles = graph_profiles(CFG, BOUNDS)
    sources = sources or {name: {onnx: "ab" * 32} for name, onnx in GRAPH_FILES.items()}
    engines = {name: EngineRecord(plan, sources[name], profiles[name])
               for name, (_, plan) in engine_files(GRAPH_FILES).items()}
    fields = {"tensorrt_version": TRT_VERSION, "gpu_name": H100.name, "compute_capability": H100.compute_capability,
              "precision": "fp16", "engines": engines, **changes}
    return TensorRTBlock(**fields)


def test_block_round_trips_through_json():
    original = block()
    data = json.loads(json.dumps(original.to_dict()))
    assert data["timing_cache"] == TIMING_CACHE_FILE
    assert data["engines"]["decode"]["profile"][INPUT_IDS] == {"min": [1, 1], "opt": [8, 1], "max": [16, 1]}
    assert TensorRTBlock.from_dict(data) == original


@pytest.mark.parametrize("broken", [{}, {"engines": []}, {"engines": {"decode": {"engine": "d.plan"}}}])
def test_a_malformed_block_is_an_artifact_error(broken):
    data = {**block().to_dict(), **broken} if broken else {}
    with pytest.raises(ArtifactError, match="rebuild the engines"):
        TensorRTBlock.from_dict(data)


def test_rebuild_command_names_checkpoint_output_and_precision(tmp_path):
    out = tmp_path / "with space"
    assert rebuild_command(out, "/ck", "bf16") == \
        f"v2t export --checkpoint_dir /ck --format trt --output '{out}' --precision bf16"
    assert rebuild_command("exp", None, "fp16").startswith("v2t export --checkpoint_dir CK --format trt")


def test_engines_of_this_tensorrt_and_gpu_are_accepted():
    check_compatible(block(), TRT_VERSION, H100, "cmd", "exp")


@pytest.mark.parametrize("version, gpu, named", [
    ("10.13.0.35", H100, ["TensorRT 10.9.0.34", "TensorRT 10.13.0.35"]),
    (TRT_VERSION, GpuIdentity("NVIDIA A100-SXM4-80GB", "8.0"), ["compute capability 9.0", "has 8.0", "A100"]),
    (TRT_VERSION, GpuIdentity("NVIDIA H100 PCIe", "9.0"), ["H100 80GB HBM3", "NVIDIA H100 PCIe"]),
], ids=["tensorrt", "compute-capability", "gpu-model"])
def test_engines_of_another_tensorrt_or_gpu_are_refused_with_the_rebuild_command(version, gpu, named):
    cmd = rebuild_command("exp", "ck", "fp16")
    with pytest.raises(ArtifactError) as err:
        check_compatible(block(), version, gpu, cmd, "exp")
    message = str(err.value)
    assert all(n in message for n in named), message
    assert cmd in message and "--backend ort" in message and "\n" not in message


def test_changed_or_missing_source_graphs_are_refused():
    record = block()
    digests = {onnx: "ab" * 32 for onnx in GRAPH_FILES.values()}
    check_sources(record, digests, "cmd", "exp")
    with pytest.raises(ArtifactError, match=f"{PREFILL_FILE}.*prefill.plan.*has changed.*Rebuild the engines: cmd"):
        check_sources(record, {**digests, PREFILL_FILE: "cd" * 32}, "cmd", "exp")
    with pytest.raises(ArtifactError, match=f"{DECODE_FILE}.*is missing"):
        check_sources(record, {**digests, DECODE_FILE: None}, "cmd", "exp")


def test_shapes_outside_a_profile_say_what_to_do():
    contract, profile = decode_contract(CFG), graph_profiles(CFG, BOUNDS)["decode"]
    spec = contract.inputs[2]  # a KV buffer
    assert outside_profile(spec, profile[spec.name], (16, 2, 10, 8), "cmd", "d.plan") is None
    fixed = outside_profile(spec, profile[spec.name], (4, 2, 20, 8), "cmd", "d.plan")
    assert f"its {CACHE_LEN} is fixed at 10, frame_num + text_len columns" in fixed and "here it is 20" in fixed
    big = outside_profile(spec, profile[spec.name], (32, 2, 10, 8), "cmd", "d.plan")
    assert f"built for {BATCH} 1 to 16, and here it is 32" in big and "--micro_batch_size" in big
    assert big.endswith("rebuild the engines for more: cmd")


# ------------------------------------------------------------------- ONNX Runtime TRT options
def test_ort_tensorrt_options_cover_every_dynamic_input(tmp_path):
    profile = graph_profiles(CFG, BOUNDS)["decode"]
    opts = ort_tensorrt_options(profile, tmp_path)
    names = decode_contract(CFG).input_names
    for key, batch in (("trt_profile_min_shapes", 1), ("trt_profile_opt_shapes", 8), ("trt_profile_max_shapes", 16)):
        entries = opts[key].split(",")
        assert [e.split(":")[0] for e in entries] == names
        assert entries[0] == f"{INPUT_IDS}:{batch}x1"
        assert entries[2] == f"{names[2]}:{batch}x2x10x8"
    assert opts["trt_engine_cache_enable"] == opts["trt_timing_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(tmp_path)
    # The precision is in the graphs: ORT builds strongly typed only while fp16/int8 are off.
    assert opts["trt_fp16_enable"] == "False" and "trt_bf16_enable" not in opts  # bf16 is off by default
    assert opts["trt_cuda_graph_enable"] == "False"  # batch varies


def test_ort_tensorrt_options_of_a_fixed_shape_profile_use_cuda_graphs(tmp_path):
    static = graph_profiles(CFG, {**BOUNDS, BATCH: (4, 4, 4), NUM_FRAMES: (8, 8, 8)})
    for profile in static.values():
        opts = ort_tensorrt_options(profile, tmp_path)
        assert opts["trt_cuda_graph_enable"] == "True"
        assert not any(k.startswith("trt_profile_") for k in opts)


# ----------------------------------------------------------------------------- refusals
def missing(monkeypatch, *modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError


def fake_tensorrt(version=TRT_VERSION):
    """Stands in for `tensorrt` where a test needs its version and nothing else: a backend that
    went on to deserialize would fail on the missing Runtime."""
    return SimpleNamespace(__version__=version)


def fake_cupy(gpu=H100, count=1, error=None):
    class CUDARuntimeError(RuntimeError):
        pass

    def device_count():
        if error:
            raise CUDARuntimeError(error)
        return count

    major, minor = gpu.compute_capability.split(".")
    runtime = SimpleNamespace(CUDARuntimeError=CUDARuntimeError, getDeviceCount=device_count,
                              getDeviceProperties=lambda i: {"name": gpu.name.encode(), "major": int(major),
                                                             "minor": int(minor)})
    return SimpleNamespace(cuda=SimpleNamespace(runtime=runtime))


def test_build_engines_without_tensorrt_is_one_line_naming_the_install_and_onnx(monkeypatch, tmp_path):
    from v2t_export.trt import build_engines, check_can_build

    missing(monkeypatch, "tensorrt")
    for call in (lambda: build_engines(tmp_path, "fp16", 8), check_can_build):
        with pytest.raises(MissingDependencyError) as err:
            call()
        message = str(err.value)
        assert "`tensorrt`" in message and "pip install 'v2t[gpu]'" in message and "--format onnx" in message
        assert "\n" not in message


def test_build_engines_without_cupy_or_gpu_is_refused(monkeypatch, tmp_path):
    from v2t_export.trt import build_engines

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    missing(monkeypatch, "cupy")
    with pytest.raises(MissingDependencyError, match="`cupy`.*--format onnx"):
        build_engines(tmp_path, "fp16", 8)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(error="cudaErrorNoDevice: no CUDA-capable device"))
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU.*cudaErrorNoDevice.*--format onnx"):
        build_engines(tmp_path, "fp16", 8)


def test_int8_exports_are_refused_before_anything_is_imported(monkeypatch, tmp_path):
    from v2t_export.trt import build_engines

    missing(monkeypatch, "tensorrt", "cupy")
    with pytest.raises(ConfigError, match="int8_encoder.*Q/DQ"):
        build_engines(tmp_path, "int8_encoder", 8)


@pytest.mark.parametrize("flags, version, expected", [({"STRONGLY_TYPED": 1}, "10.9.0.34", 2),
                                                      ({"STRONGLY_TYPED": 0}, "11.4.0", 1),
                                                      ({}, "11.4.0", 0)])
def test_networks_are_strongly_typed_on_tensorrt_10_and_11(flags, version, expected):
    from v2t_export.trt import network_flags

    trt = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(**flags), __version__=version)
    assert network_flags(trt) == expected


def test_a_tensorrt_without_strong_typing_is_refused():
    from v2t_export.trt import EngineBuildError, network_flags

    trt = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(EXPLICIT_BATCH=0), __version__="8.6.1")
    with pytest.raises(EngineBuildError, match="TensorRT 8.6.1 has no strongly typed"):
        network_flags(trt)


@pytest.fixture
def engine_dir(tmp_path):
    """An export directory as `v2t export --format trt` leaves it, with stand-in graph, tokenizer
    and engine bytes (the backend refuses it before it reads any of them)."""
    out = tmp_path / "exp"
    out.mkdir()
    sources = {}
    for name, (onnx, plan) in engine_files(GRAPH_FILES).items():
        (out / onnx).write_bytes(name.encode() * 10)
        (out / plan).write_bytes(b"plan")
        sources[name] = {onnx: file_sha256(out / onnx)}
    (out / "tokenizer.json").write_text("{}")
    (out / TIMING_CACHE_FILE).write_bytes(b"timings")
    Manifest(config=CFG, opset=17, precision="fp16", source="/ck",
             tensorrt=block(sources)).with_file_digests(out).save(out)
    return out


def write_manifest(directory, **changes):
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_backend_refuses_cpu_and_directories_without_engines(engine_dir):
    from v2t_engine.runtime.backends.trt import TrtBackend

    with pytest.raises(ConfigError, match="--device cuda.*--backend ort --device cpu"):
        TrtBackend(engine_dir, device="cpu")
    manifest = json.loads((engine_dir / MANIFEST_FILE).read_text())
    del manifest[MANIFEST_KEY]
    (engine_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="no TensorRT engines.*--format trt.*--backend ort"):
        TrtBackend(engine_dir)
    assert not TrtBackend.accepts(engine_dir)
    assert not TrtBackend.accepts(engine_dir.parent)  # no manifest at all


def test_backend_without_tensorrt_or_cupy_is_one_line_naming_the_alternative(monkeypatch, engine_dir):
    from v2t_engine.runtime.backends.trt import TrtBackend

    missing(monkeypatch, "tensorrt")
    with pytest.raises(MissingDependencyError) as err:
        TrtBackend(engine_dir)
    message = str(err.value)
    assert "`tensorrt`" in message and "pip install 'v2t[gpu]'" in message
    assert f"run the ONNX graphs in {engine_dir} with --backend ort" in message and "\n" not in message
    assert not TrtBackend.accepts(engine_dir)  # `auto` passes over it to ONNX Runtime
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    missing(monkeypatch, "cupy")
    with pytest.raises(MissingDependencyError, match="`cupy`.*--backend ort"):
        TrtBackend(engine_dir)


@pytest.mark.parametrize("version, gpu, named", [
    ("10.13.0.35", H100, "TensorRT 10.9.0.34"),
    (TRT_VERSION, GpuIdentity("NVIDIA L4", "8.9"), "compute capability 9.0"),
    (TRT_VERSION, GpuIdentity("NVIDIA H100 PCIe", "9.0"), "NVIDIA H100 PCIe"),
], ids=["tensorrt", "compute-capability", "gpu-model"])
def test_backend_refuses_other_tensorrt_or_gpu_before_deserializing(monkeypatch, engine_dir, version, gpu, named):
    from v2t_engine.runtime.backends.trt import TrtBackend

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(gpu))
    with pytest.raises(ArtifactError) as err:
        TrtBackend(engine_dir, device="cuda")
    assert named in str(err.value)
    assert f"Rebuild them here: v2t export --checkpoint_dir /ck --format trt --output {engine_dir} " \
           "--precision fp16" in str(err.value)
    assert not TrtBackend.accepts(engine_dir)


def test_backend_refuses_a_machine_without_gpu(monkeypatch, engine_dir):
    from v2t_engine.runtime.backends.trt import TrtBackend

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(count=0))
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU.*CUDA sees no device.*--backend ort"):
        TrtBackend(engine_dir)


def test_backend_refuses_engines_whose_graphs_changed(monkeypatch, engine_dir):
    from v2t_engine.runtime.backends.trt import TrtBackend

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    # A graph re-exported from the same model: the same size, other bytes.
    (engine_dir / PREFILL_FILE).write_bytes(b"P" * (engine_dir / PREFILL_FILE).stat().st_size)
    # The manifest's record still matches the engines: only hashing the file (verify) finds it.
    with pytest.raises(ArtifactError, match=f"{PREFILL_FILE}.*has changed.*--format trt"):
        TrtBackend(engine_dir, verify=True)
    # A re-export rewrites the record: then the recorded digest alone refuses the old engines.
    files = json.loads((engine_dir / MANIFEST_FILE).read_text())["files"]
    files[PREFILL_FILE]["sha256"] = file_sha256(engine_dir / PREFILL_FILE)
    write_manifest(engine_dir, files=files)
    with pytest.raises(ArtifactError, match=f"{PREFILL_FILE}.*prefill.plan.*has changed"):
        TrtBackend(engine_dir)
    assert not TrtBackend.accepts(engine_dir)


def test_backend_refuses_missing_engines_and_another_precision(monkeypatch, engine_dir):
    from v2t_engine.runtime.backends.trt import TrtBackend

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    with pytest.raises(ConfigError, match="compute in fp16.*--precision bf16"):
        TrtBackend(engine_dir, precision="bf16")
    (engine_dir / "decode.plan").unlink()
    with pytest.raises(ArtifactError, match="decode.plan, the decode engine, is missing.*--format trt"):
        TrtBackend(engine_dir)
    (engine_dir / "decode.plan").write_bytes(b"plan")
    manifest = json.loads((engine_dir / MANIFEST_FILE).read_text())
    del manifest[MANIFEST_KEY]["engines"]["prefill"]
    (engine_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="lists no engine for prefill.*--format trt"):
        TrtBackend(engine_dir)


# ------------------------------------------------------------------ the manifest's TensorRT block
def test_manifest_lists_the_engines_and_timing_cache_and_round_trips_the_block(engine_dir):
    manifest = Manifest.load(engine_dir, verify=True)
    assert manifest.tensorrt == block({name: {onnx: file_sha256(engine_dir / onnx)}
                                       for name, onnx in GRAPH_FILES.items()})
    for name in ("frame_encoder.plan", "prefill.plan", "decode.plan"):
        assert manifest.files[name]["bytes"] == (engine_dir / name).stat().st_size
    assert TIMING_CACHE_FILE not in manifest.files  # a cache: only a rebuild reads it
    data = json.loads((engine_dir / MANIFEST_FILE).read_text())
    assert data[MANIFEST_KEY] == manifest.tensorrt.to_dict()
    # Without engines the key is absent, not null.
    plain = Manifest(config=CFG, opset=17)
    assert MANIFEST_KEY not in plain.to_dict() and plain.tensorrt is None


@pytest.mark.parametrize("broken", [None, [], {"tensorrt_version": "10"}])
def test_a_malformed_block_fails_the_manifest_naming_its_file(engine_dir, broken):
    write_manifest(engine_dir, **{MANIFEST_KEY: broken})
    with pytest.raises(ArtifactError, match=f"{engine_dir / MANIFEST_FILE}: the {MANIFEST_KEY} block is malformed"):
        Manifest.load(engine_dir)


def test_a_truncated_engine_fails_the_load_naming_the_rebuild_and_a_deleted_timing_cache_does_not(engine_dir):
    (engine_dir / "prefill.plan").write_bytes(b"pl")
    with pytest.raises(ArtifactError, match=r"prefill.plan, the prefill engine, is 2 bytes, the manifest says 4: "
                                            r"truncated or replaced; rebuild the engines: v2t export "
                                            r"--checkpoint_dir /ck --format trt"):
        Manifest.load(engine_dir)
    (engine_dir / "prefill.plan").write_bytes(b"plan")
    (engine_dir / TIMING_CACHE_FILE).unlink()
    Manifest.load(engine_dir, verify=True)  # the ONNX graphs and the engines are all there


def test_fixed_sizes_of_a_profile():
    from v2t_engine.runtime.contract import encoder_contract
    from v2t_engine.runtime.tensorrt import fixed_size

    profiles = graph_profiles(CFG, BOUNDS)
    assert fixed_size(decode_contract(CFG), profiles["decode"], CACHE_LEN) == cache_len(CFG)
    assert fixed_size(decode_contract(CFG), profiles["decode"], BATCH) is None  # 1..16
    assert fixed_size(encoder_contract(CFG), profiles["frame_encoder"], CACHE_LEN) is None  # no such axis


# -------------------------------------------------------------- choosing the backend of a directory
@pytest.fixture
def onnx_and_engines(random_export, tmp_path):
    """The random model's real ONNX export, with stand-in engines for 8 rows listed in its
    manifest as `v2t export --format trt` lists them."""
    out = tmp_path / "exp"
    shutil.copytree(random_export, out)
    manifest = Manifest.load(out)
    cfg = manifest.config
    profiles = graph_profiles(cfg, default_bounds(cfg, 8, 8 * cfg.frame_num))
    engines = {}
    for name, (onnx, plan) in engine_files(manifest.graph_files).items():
        (out / plan).write_bytes(b"plan")
        sources = [n for n in (onnx, onnx + ".data") if (out / n).is_file()]
        engines[name] = EngineRecord(plan, {n: file_sha256(out / n) for n in sources}, profiles[name])
    (out / TIMING_CACHE_FILE).write_bytes(b"timings")
    trt_block = TensorRTBlock(TRT_VERSION, H100.name, H100.compute_capability, manifest.precision, engines)
    dataclasses.replace(manifest, tensorrt=trt_block).with_file_digests(out).save(out)
    return out


class Chosen(Exception):
    """What the stand-in TensorRT raises once the trt backend got past every check."""


def runnable_tensorrt():
    """A stand-in TensorRT that the trt backend's checks accept, and that raises Chosen where the
    backend starts deserializing engines."""
    class Logger:
        WARNING = 0

        def __init__(self, level):
            pass

    def runtime(logger):
        raise Chosen

    return SimpleNamespace(__version__=TRT_VERSION, Logger=Logger, Runtime=runtime)


def test_auto_runs_the_onnx_graphs_on_the_cpu_and_the_engines_on_cuda(monkeypatch, onnx_and_engines, test_pixels):
    from v2t_engine.runtime.backends import load_backend

    backend = load_backend(onnx_and_engines, device="cpu")
    assert backend.name == "ort"  # the trt backend runs on cuda only: never tried here
    assert greedy(backend, test_pixels[:2]).shape[0] == 2  # the graphs beside the engines still run
    monkeypatch.setitem(sys.modules, "tensorrt", runnable_tensorrt())
    cupy = fake_cupy()
    cupy.cuda.Stream = lambda non_blocking: None
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    with pytest.raises(Chosen):
        load_backend(onnx_and_engines, device="cuda")


def test_auto_on_cuda_passes_over_engines_this_machine_cannot_run_and_says_why(monkeypatch, onnx_and_engines,
                                                                              caplog):
    from v2t_engine.runtime.backends import load_backend

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.13.0.35"))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: ["CPUExecutionProvider"])
    # ONNX Runtime's CUDA provider is next; this onnxruntime has none, so its refusal ends it.
    with pytest.raises(ConfigError, match="--device cuda: this onnxruntime has no CUDAExecutionProvider"):
        load_backend(onnx_and_engines, device="cuda")
    assert "not running the TensorRT engines" in caplog.text and "TensorRT 10.9.0.34" in caplog.text


def test_backend_trt_named_explicitly_gives_its_own_refusal(monkeypatch, onnx_and_engines, random_export):
    from v2t_engine.runtime.backends import load_backend

    with pytest.raises(ConfigError, match="runs TensorRT engines on an NVIDIA GPU: use --device cuda"):
        load_backend(onnx_and_engines, backend="trt", device="cpu")
    missing(monkeypatch, "tensorrt")
    with pytest.raises(MissingDependencyError, match="`tensorrt` module.*--backend ort"):
        load_backend(onnx_and_engines, backend="trt", device="cuda")
    with pytest.raises(ArtifactError, match="holds no TensorRT engines: build them with `v2t export --format trt`"):
        load_backend(random_export, backend="trt", device="cuda")


def test_a_backend_named_for_a_device_it_does_not_run_on_is_refused(random_checkpoint):
    from v2t_engine.runtime.backends import load_backend

    with pytest.raises(ConfigError, match="--backend torch runs on --device cpu or cuda, not tensorrt"):
        load_backend(random_checkpoint, backend="torch", device="tensorrt")


# ------------------------------------------------------------------- ONNX Runtime's TRT provider
def test_tensorrt_device_needs_the_provider(monkeypatch):
    from v2t_engine.runtime.backends.ort import providers_for

    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="--device tensorrt: this onnxruntime has no TensorrtExecutionProvider"):
        providers_for("tensorrt")
    monkeypatch.setattr("onnxruntime.get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    options = {"trt_fp16_enable": "False"}
    assert providers_for("tensorrt", tensorrt_options=options) == [
        ("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_tensorrt_device_takes_the_engines_profiles_or_the_defaults(onnx_and_engines, random_export, tmp_path):
    from v2t_engine.runtime.backends.ort import tensorrt_setup
    from v2t_engine.runtime.tensorrt import DEFAULT_MAX_BATCH, ORT_CACHE_DIR

    manifest = Manifest.load(onnx_and_engines)
    cfg = manifest.config
    options, columns = tensorrt_setup(manifest, onnx_and_engines)
    assert set(options) == set(manifest.graph_files) and columns == cache_len(cfg)
    assert options["decode"] == ort_tensorrt_options(manifest.tensorrt.engines["decode"].profile,
                                                     onnx_and_engines / ORT_CACHE_DIR)
    assert options["decode"]["trt_profile_max_shapes"].startswith(f"{INPUT_IDS}:8x1,")
    assert (onnx_and_engines / ORT_CACHE_DIR).is_dir()
    plain = tmp_path / "plain"
    shutil.copytree(random_export, plain)
    options, columns = tensorrt_setup(Manifest.load(plain), plain)
    assert options["decode"]["trt_profile_max_shapes"].startswith(f"{INPUT_IDS}:{DEFAULT_MAX_BATCH}x1,")
    assert columns == cache_len(cfg)


def test_a_session_that_fell_back_from_tensorrt_is_refused():
    from v2t_engine.runtime.backends.ort import check_tensorrt_provider

    session = SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="could not start its TensorRT provider.*--device cuda"):
        check_tensorrt_provider(session, "decode.onnx")


# ------------------------------------------------------------ a decode graph of one cache length
def test_slot_decoder_allocates_a_backends_fixed_cache_length(random_export, test_pixels):
    from v2t_engine.runtime.backends.ort import OrtBackend
    from v2t_engine.runtime.slot_decoder import BoundSlotDecoder

    backend = OrtBackend(random_export)
    cfg, pixels = backend.config, test_pixels[:6]
    want = greedy(backend, pixels)
    backend.fixed_cache_len = cache_len(cfg) + 5  # more columns than captions need change nothing
    assert BoundSlotDecoder(backend, 4, cfg.frame_num, cfg.text_len).cache_len == cache_len(cfg) + 5
    assert np.array_equal(greedy(backend, pixels), want)
    backend.fixed_cache_len = cache_len(cfg)
    assert BoundSlotDecoder(backend, 4, cfg.frame_num, cfg.text_len - 3).cache_len == cache_len(cfg)
    with pytest.raises(ConfigError, match=f"need {cache_len(cfg) + 1} KV cache columns, and the ort backend's "
                                          f"decode graph has {cache_len(cfg)}: ask for captions of at most "
                                          f"{cfg.text_len} tokens"):
        BoundSlotDecoder(backend, 4, cfg.frame_num, cfg.text_len + 1)


# ------------------------------------------------------------------- v2t export --format trt
def test_export_refuses_int8_engines_before_any_work(tmp_path):
    pytest.importorskip("torch")
    from v2t_export.exporter import export_checkpoint

    with pytest.raises(ConfigError, match="--format trt builds fp32, fp16, bf16 exports, not int8"):
        export_checkpoint(tmp_path / "no-checkpoint", tmp_path / "out", "trt", "int8")


@pytest.mark.slow  # a whole export and its validation
def test_export_trt_builds_into_the_validated_export_and_lists_the_engines(monkeypatch, random_checkpoint,
                                                                          tmp_path):
    """The wiring of `v2t export --format trt` on the CPU: the builder and the GPU validation are
    stand-ins (they need TensorRT); what the exporter does with them is real."""
    pytest.importorskip("torch")
    import v2t_export.exporter as exporter

    calls = {}

    def build(export_dir, precision, max_batch, reuse_timing_cache=None):
        calls.update(graphs=sorted(p.name for p in Path(export_dir).glob("*.onnx")), max_batch=max_batch,
                     reuse=reuse_timing_cache)
        cfg = Manifest.load(export_dir).config
        profiles = graph_profiles(cfg, default_bounds(cfg, max_batch, max_batch * cfg.frame_num))
        records = {}
        for name, (onnx, plan) in engine_files(Manifest.load(export_dir).graph_files).items():
            (Path(export_dir) / plan).write_bytes(b"engine " + name.encode())
            records[name] = EngineRecord(plan, {onnx: file_sha256(Path(export_dir) / onnx)}, profiles[name])
        (Path(export_dir) / TIMING_CACHE_FILE).write_bytes(b"new timings")
        return TensorRTBlock(TRT_VERSION, H100.name, H100.compute_capability, precision, records)

    def validate(model, export_dir, precision, n_videos, min_agreement):
        calls["validated"] = Manifest.load(export_dir).tensorrt is not None
        return {"validated": True, "greedy_token_agreement": 1.0, "greedy_videos": n_videos}

    monkeypatch.setattr(exporter, "check_can_build", lambda: None)
    monkeypatch.setattr(exporter, "build_engines", build)
    monkeypatch.setattr(exporter, "validate_engines", validate)
    out = tmp_path / "trt"
    out.mkdir()
    (out / TIMING_CACHE_FILE).write_bytes(b"old timings")  # the engines this export replaces
    manifest = exporter.export_checkpoint(random_checkpoint, out, "trt", "fp32", max_batch=2)
    assert calls == {"graphs": [DECODE_FILE, ENCODER_FILE, PREFILL_FILE], "max_batch": 2,
                     "reuse": out / TIMING_CACHE_FILE, "validated": True}
    assert (out / TIMING_CACHE_FILE).read_bytes() == b"new timings"
    assert manifest.validation["validated"] and manifest.validation["tensorrt"]["greedy_videos"] == 2
    loaded = Manifest.load(out, verify=True)
    assert loaded.tensorrt == manifest.tensorrt and "decode.plan" in loaded.files
    assert loaded.validation == manifest.validation
    from v2t_engine.runtime.backends import load_backend

    assert load_backend(out).name == "ort"  # the ONNX graphs stay, and run


# ------------------------------------------------------------------- GPU with TensorRT only
def _can_run_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("cupy") is None:
        return False
    import cupy

    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except cupy.cuda.runtime.CUDARuntimeError:
        return False


needs_tensorrt = pytest.mark.skipif(not _can_run_tensorrt(), reason="needs TensorRT and a CUDA GPU")


@pytest.fixture(scope="module")
def trt_export(random_export, tmp_path_factory):
    """The random model's fp32 export with engines built for 8 slots, as `v2t export --format trt`
    leaves it."""
    from v2t_export.trt import build_engines

    out = tmp_path_factory.mktemp("trt") / "exp"
    shutil.copytree(random_export, out)
    built = build_engines(out, "fp32", max_batch=8)
    dataclasses.replace(Manifest.load(out), tensorrt=built).with_file_digests(out).save(out)
    return out


def heldout_crops(synth_data, cfg):
    from v2t_engine.inputs.frames import FrameSource, row_frames_or_error
    from v2t_engine.inputs.tables import InputSchema, read_table

    from conftest import TEST_SCHEMA

    rows = read_table(synth_data["test"], InputSchema.parse(TEST_SCHEMA))
    return np.stack([row_frames_or_error(r, "imgbase64", cfg.frame_num, cfg.img_size, FrameSource())[0]
                     for r in rows])


def greedy(backend, crops):
    from v2t_engine.runtime.generator import generate_candidates
    from v2t_engine.runtime.search import SearchOptions

    cfg = backend.config
    return generate_candidates(backend, crops, SearchOptions(), np.random.default_rng(0), cfg.text_len)[:, 0]


@pytest.mark.gpu
@needs_tensorrt
def test_trt_engines_caption_as_onnx_runtime_does(trt_export, synth_data):
    from v2t_engine.runtime.backends.ort import OrtBackend
    from v2t_engine.runtime.backends.trt import TrtBackend

    trt_backend = TrtBackend(trt_export, device="cuda", verify=True)
    ort_backend = OrtBackend(trt_export)
    crops = heldout_crops(synth_data, trt_backend.config)
    frames = crops.reshape(-1, *crops.shape[2:])
    np.testing.assert_allclose(trt_backend.encode_frames(frames), ort_backend.encode_frames(frames), atol=2e-2)
    share = float(np.mean([np.array_equal(a, b) for a, b in zip(greedy(trt_backend, crops), greedy(ort_backend, crops))]))
    print(f"TensorRT fp32 engines: {share:.1%} of {len(crops)} greedy captions equal ONNX Runtime's")
    assert share >= 0.98


@pytest.mark.gpu
@needs_tensorrt
def test_trt_decode_graph_replay_gives_the_eager_tokens(trt_export, synth_data):
    from v2t_engine.runtime.backends.trt import TrtBackend

    backend = TrtBackend(trt_export, device="cuda")
    crops = heldout_crops(synth_data, backend.config)
    replayed = greedy(backend, crops)
    assert backend.batch_buckets and backend._graphs  # graphs were captured
    backend.cuda_graphs = False
    assert np.array_equal(greedy(backend, crops), replayed)


@pytest.mark.gpu
@needs_tensorrt
def test_export_format_trt_then_predict_on_cuda_runs_the_engines(random_checkpoint, tmp_path):
    from conftest import run_cli

    from v2t_engine.runtime.captioner import Captioner

    out = tmp_path / "trt"
    run_cli(["export", "--checkpoint_dir", random_checkpoint, "--format", "trt", "--output", out, "--max_batch", 8])
    manifest = Manifest.load(out, verify=True)
    engines = manifest.validation["tensorrt"]
    print(f"TensorRT fp32 engines: greedy agreement with PyTorch {engines['greedy_token_agreement']:.1%}")
    assert engines["validated"] and engines["greedy_token_agreement"] == 1.0
    assert Captioner.load(out, device="cuda").backend.name == "trt"
    assert Captioner.load(out, device="cpu").backend.name == "ort"

"""TensorRT (issue 16): everything that needs no TensorRT is checked on the CPU.

- Optimization profiles derived from the contract: every input of every graph, min <= opt <= max,
  fixed sizes fixed, bad bounds refused.
- The manifest's TensorRT block: round trip, and the refusals of engines built by another
  TensorRT, for another GPU, or from graphs that have changed since, each naming the command that
  rebuilds them.
- ONNX Runtime's TensorRT provider options.
- The one-line refusals of `build_engines` and `TrtBackend` where `tensorrt`, CuPy or a GPU is
  missing. Modules are made missing by putting None in sys.modules (then `import` fails), so the
  tests are real on a machine that has them too; where a test needs a TensorRT or CuPy to report
  a version or a GPU, a namespace standing in for the module does, and the test shows that the
  backend refuses before it would call anything else of it.

Tests marked gpu build engines from a real export and compare the TensorRT backend's captions with
ONNX Runtime's; they skip where TensorRT and a CUDA GPU are missing (every machine of this
project so far).
"""
import importlib.util
import json
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from v2t_engine.config import ModelConfig
from v2t_engine.errors import ArtifactError, ConfigError, MissingDependencyError
from v2t_engine.runtime.contract import (BATCH, CACHE_LEN, DECODE_FILE, ENCODER_FILE, FRAMES, INPUT_IDS,
                                         MANIFEST_FILE, NUM_FRAMES, POSITION_IDS, PREFILL_FILE, PREFIX_EMBEDS,
                                         PREFIX_LEN, cache_len, cache_names, decode_contract, graph_contracts)
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
    """An export directory as `v2t export --format trt` leaves it, with stand-in graph and engine
    bytes (the backend refuses it before it reads either)."""
    out = tmp_path / "exp"
    out.mkdir()
    files, sources = {}, {}
    for name, (onnx, plan) in engine_files(GRAPH_FILES).items():
        (out / onnx).write_bytes(name.encode() * 10)
        (out / plan).write_bytes(b"plan")
        digest = file_sha256(out / onnx)
        files[onnx] = {"bytes": (out / onnx).stat().st_size, "sha256": digest}
        sources[name] = {onnx: digest}
    manifest = {"model_config": CFG.to_dict(), "tokenizer": "tokenizer.json", "precision": "fp16",
                "source_checkpoint": "/ck", "graphs": {n: {"file": f} for n, f in GRAPH_FILES.items()},
                "files": files, MANIFEST_KEY: block(sources).to_dict()}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
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
    (engine_dir / PREFILL_FILE).write_bytes(b"a re-exported graph")
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
    manifest = json.loads((engine_dir / MANIFEST_FILE).read_text())
    del manifest[MANIFEST_KEY]["engines"]["prefill"]
    (engine_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="lists no engine for prefill.*--format trt"):
        TrtBackend(engine_dir)


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
    write_manifest(out, **{MANIFEST_KEY: built.to_dict()})
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

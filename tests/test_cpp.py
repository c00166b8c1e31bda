"""The C++ embedding (cpp/): libv2t, its C API and v2t-caption, checked against the Python runtime
on the random-weight export.

`cpp/build.sh` fetches the dependencies (cpp/deps.sh) and builds once per session (CI runs it
before pytest, so here it finds the build done). Without g++ the tests skip, except under CI,
where they fail: CI must run them.
"""
import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "cpp"


def _unavailable(reason):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must build and run the C++ tests)")
    pytest.skip(reason)


def _build(*flags):
    if shutil.which("g++") is None:
        _unavailable("no g++: apt-get install g++ (cpp/deps.sh installs the rest)")
    result = subprocess.run(["bash", str(CPP / "build.sh"), *flags], capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        _unavailable(f"cpp/build.sh {' '.join(flags)} failed:\n{result.stderr[-3000:]}")


@pytest.fixture(scope="module")
def cpp_build():
    _build()
    return CPP / "build"


def run(program, *args, env=None, check=True):
    result = subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, f"{program.name} {args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def jpeg_videos(synth_data, tmp_path_factory):
    """The synthetic test table's videos as JPEG files: (idxs, [[path, ...], ...]), all frames."""
    folder = tmp_path_factory.mktemp("cpp_frames")
    idxs, videos = [], []
    for line in Path(synth_data["test"]).read_text(encoding="utf-8").splitlines():
        idx, field = line.split("\t")[:2]
        paths = []
        for i, b64 in enumerate(json.loads(field)):
            paths.append(folder / f"{idx}_{i}.jpg")
            paths[-1].write_bytes(base64.b64decode(b64))
        idxs.append(idx)
        videos.append(paths)
    return idxs, videos


def write_list(path, videos, frames=None):
    path.write_text("".join(" ".join(map(str, v[:frames])) + "\n" for v in videos), encoding="utf-8")
    return path


def _python_crops(cap, synth_data):
    """uint8 crops (N, F, 3, S, S) of the synthetic test clips (decoded as predict decodes them)
    and of random-noise clips."""
    from v2t_engine.inputs.frames import FrameSource, load_row_frames

    F, S = cap.config.frame_num, cap.config.img_size
    crops = [load_row_frames(line.split("\t")[1], F, S, FrameSource())[0]
             for line in Path(synth_data["test"]).read_text(encoding="utf-8").splitlines()]
    crops += list(np.random.default_rng(0).integers(0, 256, (8, F, 3, S, S), dtype=np.uint8))
    return np.stack(crops)


def _check_same_crops_same_tokens(cpp_build, export, crops, tmp_path, batches, text_lens=(None,)):
    """libv2t's greedy token ids and captions of the uint8 crops equal the Python Captioner's, for
    each batch size (rows that end early while others run) and caption length limit (the KV
    buffer's cache_len = frame_num + max_new_tokens). Returns Python's captions."""
    from v2t_engine import Captioner

    cap = Captioner.load(export)
    (tmp_path / "crops.bin").write_bytes(np.ascontiguousarray(crops, np.uint8).tobytes())
    for text_len in text_lens:
        ids = cap.generate_ids(crops, text_len=text_len)[:, 0].tolist()
        python = [c[0] for c in cap.caption_pixels(crops, text_len=text_len)]
        for batch in batches:
            out = run(cpp_build / "v2t-test", "pixels", export, tmp_path / "crops.bin", len(crops), batch, text_len or 0)
            lines = [line.split("\t") for line in out.stdout.splitlines()]
            assert [list(map(int, ids_.split())) for ids_, _ in lines] == ids, (text_len, batch)
            assert [caption for _, caption in lines] == python, (text_len, batch)
    return python


@pytest.mark.slow  # six runs of the library, ~4 s; test_same_jpegs_give_predict_captions stays in the fast tier
def test_same_crops_give_python_captions(cpp_build, random_export, synth_data, tmp_path):
    """Identical uint8 crops (the synthetic test clips and random-noise clips) handed to the frame
    encoder: libv2t's greedy token ids equal the Python Captioner's, in one batch, in batches of 8
    and one at a time, at the model's text_len and at a shorter limit."""
    from v2t_engine import Captioner

    crops = _python_crops(Captioner.load(random_export), synth_data)
    python = _check_same_crops_same_tokens(cpp_build, random_export, crops, tmp_path, (len(crops), 8, 1), (None, 5))
    assert len(set(python)) > 3  # the captions depend on the frames


@pytest.mark.slow
def test_trained_model_gives_python_captions(cpp_build, trained_export, synth_data, tmp_path):
    """The same on the trained recipe model, whose captions end at lengths that differ from row to
    row (so rows leave a batch's steps at different times)."""
    from v2t_engine import Captioner

    crops = _python_crops(Captioner.load(trained_export), synth_data)
    python = _check_same_crops_same_tokens(cpp_build, trained_export, crops, tmp_path, (len(crops), 8))
    assert len(set(python)) > 3


def test_same_jpegs_give_predict_captions(cpp_build, random_export, synth_data, jpeg_videos, tmp_path):
    """v2t-caption on the test clips' JPEG files prints what `v2t predict` writes for the table
    (the first frame_num frames of each clip, decoded by libjpeg-turbo instead of Pillow)."""
    idxs, videos = jpeg_videos
    run_cli(["predict", "--tables", synth_data["test"], "--outputs", tmp_path / "out.txt",
             "--checkpoint_dir", random_export, "--input_schema", "idx:str:1,imgbase64:str:1",
             "--first_sequence", "imgbase64"])
    python = {}
    for line in (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines():
        idx, captions = line.split("\t")
        python[idx] = json.loads(captions)[0]
    out = run(cpp_build / "v2t-caption", random_export, "--list", write_list(tmp_path / "videos.txt", videos))
    cpp = dict(zip(idxs, out.stdout.splitlines()))
    differ = {i: (python[i], cpp[i]) for i in idxs if python[i] != cpp[i]}
    assert len(differ) <= 0.01 * len(idxs), differ


def _test_images(folder):
    """Images of the shapes and formats frames come in, made with Pillow: JPEG (4:2:0, 4:4:4,
    progressive, grey), PNG (RGB, grey, RGBA, palette), sizes that shrink, grow, or need no resize."""
    rng = np.random.default_rng(0)

    def picture(w, h, c):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * 255 / w + 40 * k) % 256 * 0.5 + y * 76 / h for k in range(c)], -1)
        return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)

    paths = []
    for w, h in [(64, 64), (96, 72), (50, 37), (300, 200), (97, 131), (33, 33), (640, 360)]:
        rgb, grey = Image.fromarray(picture(w, h, 3)), Image.fromarray(picture(w, h, 1)[..., 0])
        for name, image, options in [("420.jpg", rgb, {"quality": 90}), ("444.jpg", rgb, {"quality": 95, "subsampling": 0}),
                                     ("prog.jpg", rgb, {"quality": 80, "progressive": True}), ("grey.jpg", grey, {}),
                                     ("rgb.png", rgb, {}), ("grey.png", grey, {}),
                                     ("rgba.png", Image.fromarray(picture(w, h, 4)), {}),
                                     ("palette.png", rgb.quantize(64, method=Image.Quantize.FASTOCTREE), {})]:
            paths.append(folder / f"{w}x{h}_{name}")
            image.save(paths[-1], **options)
    return paths


def test_crops_equal_pillow_crops(cpp_build, random_export, tmp_path):
    """libv2t's uint8 crops (libjpeg-turbo / libpng, then Pillow's resampling arithmetic) equal
    Python's crop_frame on every test image, pixel for pixel."""
    from v2t_engine.inputs.frames import open_image
    from v2t_engine.inputs.preprocess import crop_frame

    paths = _test_images(tmp_path)
    run(cpp_build / "v2t-test", "crops", random_export, tmp_path / "crops.bin", *paths)
    S = json.loads((Path(random_export) / "manifest.json").read_text())["model_config"]["img_size"]
    got = np.fromfile(tmp_path / "crops.bin", np.uint8).reshape(len(paths), 3, S, S)
    want = [crop_frame(open_image(p.read_bytes(), 10 ** 8), S) for p in paths]
    differ = {p.name: int(np.abs(w.astype(int) - g).max()) for p, w, g in zip(paths, want, got) if not np.array_equal(w, g)}
    assert not differ, f"max differences of the crops that differ: {differ}"


def test_preprocess_gives_crop_frame_crops(cpp_build, random_export, jpeg_videos, tmp_path):
    """What libv2t hands the frame encoder, preprocess() of whole videos (frames decoded by two
    threads), is Python's crop_frame uint8 crop of each frame, byte for byte, in video and frame
    order."""
    from v2t_engine.inputs.frames import open_image
    from v2t_engine.inputs.preprocess import crop_frame

    manifest = json.loads((Path(random_export) / "manifest.json").read_text())
    F, S = manifest["model_config"]["frame_num"], manifest["model_config"]["img_size"]
    videos = [v[:F] for v in jpeg_videos[1][:6]]
    run(cpp_build / "v2t-test", "preprocess", random_export, tmp_path / "crops.bin", write_list(tmp_path / "l.txt", videos))
    got = np.fromfile(tmp_path / "crops.bin", np.uint8)
    want = np.stack([[crop_frame(open_image(p.read_bytes(), 10 ** 8), S) for p in v] for v in videos])
    assert got.size == want.size and np.array_equal(got.reshape(want.shape), want)


def test_c_api_error_paths(cpp_build, random_export, jpeg_videos):
    out = run(cpp_build / "v2t-test", "errors", random_export, jpeg_videos[1][0][0], check=False)
    assert out.returncode == 0 and "FAIL" not in out.stdout, out.stdout + out.stderr
    assert out.stdout.count("PASS") >= 15


def _broken_exports(export, root):
    """name → (export directory, what the error must name)."""
    cases = {}

    def copy(name):
        target = root / name
        shutil.copytree(export, target)
        return target

    d = copy("no_manifest")
    (d / "manifest.json").unlink()
    cases["no_manifest"] = (d, "not a v2t export directory")
    d = copy("truncated")
    data = (d / "decode.onnx").read_bytes()
    (d / "decode.onnx").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (d, "decode.onnx is")

    def edit_manifest(name, change):
        d = copy(name)
        manifest = json.loads((d / "manifest.json").read_text())
        change(manifest)
        (d / "manifest.json").write_text(json.dumps(manifest))
        return d

    def swap(name, source, target):  # one graph's file where another's should be, sizes updated
        d = copy(name)
        shutil.copy(d / source, d / target)
        manifest = json.loads((d / "manifest.json").read_text())
        manifest["files"][target]["bytes"] = (d / target).stat().st_size
        (d / "manifest.json").write_text(json.dumps(manifest))
        return d

    cases["off_contract"] = (edit_manifest("off_contract", lambda m: m["graphs"]["decode"]["inputs"][0].update(
        dtype="int32")), "contract")
    # a version-1 export (float32 frames, one decoder graph): re-export, not a crash
    cases["version_1"] = (edit_manifest("version_1", lambda m: m.update(format_version=1)), "unsupported format")
    cases["float_frames"] = (edit_manifest("float_frames", lambda m: m["graphs"]["frame_encoder"]["inputs"][0].update(
        dtype="float32")), "frame_encoder graph's declared inputs")
    cases["normalized_by"] = (edit_manifest("normalized_by", lambda m: m["preprocessing"].update(
        normalized_by="host")), "normalized_by")
    cases["swapped"] = (swap("swapped", "frame_encoder.onnx", "decode.onnx"), "has no input 'input_ids'")
    cases["swapped_prefill"] = (swap("swapped_prefill", "decode.onnx", "prefill.onnx"), "has no input 'prefix_embeds'")
    cases["missing_prefill"] = (copy("missing_prefill"), "prefill.onnx is missing")
    (cases["missing_prefill"][0] / "prefill.onnx").unlink()
    d = copy("bf16")  # what a bf16 export's manifest says (its graphs keep fp32 inputs and outputs)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["precision"] = "bf16"
    (d / "manifest.json").write_text(json.dumps(manifest))
    cases["bf16"] = (d, "bfloat16")
    return cases


def test_bad_exports_and_frames_are_errors(cpp_build, random_export, jpeg_videos, tmp_path):
    """Exit status 1 and a message naming the fault, never a crash; one bad video of a list costs
    only its own line."""
    frames = jpeg_videos[1][0][:4]
    for name, (directory, mention) in _broken_exports(Path(random_export), tmp_path).items():
        out = run(cpp_build / "v2t-caption", directory, *frames, check=False)
        assert out.returncode == 1 and mention in out.stderr, (name, out.stderr)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    videos = [frames, [tmp_path / "bad.jpg", *frames[1:]], [tmp_path / "missing.jpg"], frames]
    out = run(cpp_build / "v2t-caption", random_export, "--list", write_list(tmp_path / "l.txt", videos), check=False)
    lines = out.stdout.split("\n")[:-1]
    assert out.returncode == 1 and len(lines) == 4
    assert lines[0] == lines[3] != "" and lines[1] == lines[2] == ""
    assert "bad.jpg: cannot decode JPEG" in out.stderr and "missing.jpg" in out.stderr


def test_threads_share_a_captioner(cpp_build, random_export, jpeg_videos, tmp_path):
    """Four threads captioning the same videos at once, in other batch sizes, with one Captioner,
    get the single-thread captions."""
    videos = write_list(tmp_path / "l.txt", jpeg_videos[1], frames=4)
    out = run(cpp_build / "v2t-test", "threads", random_export, videos, 4, check=False)
    assert out.returncode == 0 and out.stdout.count("PASS") == 4, out.stdout + out.stderr


def test_sampling_is_seeded(cpp_build, random_export, jpeg_videos, tmp_path):
    videos = write_list(tmp_path / "l.txt", jpeg_videos[1][:8], frames=4)
    out = run(cpp_build / "v2t-test", "sampling", random_export, videos, check=False)
    assert out.returncode == 0 and out.stdout.count("PASS") == 3, out.stdout + out.stderr


@pytest.mark.slow
def test_sanitizers_are_clean(random_export, jpeg_videos, tmp_path):
    """The test program and v2t-caption built with AddressSanitizer (leaks included) and
    UndefinedBehaviorSanitizer: every check passes and no report is printed."""
    _build("--sanitize")
    build = CPP / "build-asan"
    env = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    videos = write_list(tmp_path / "l.txt", jpeg_videos[1][:6], frames=4)
    manifest = json.loads((Path(random_export) / "manifest.json").read_text())
    F, S = manifest["model_config"]["frame_num"], manifest["model_config"]["img_size"]
    (tmp_path / "crops.bin").write_bytes(np.random.default_rng(1).integers(0, 256, (5, F, 3, S, S), np.uint8).tobytes())
    runs = [run(build / "v2t-test", "errors", random_export, jpeg_videos[1][0][0], env=env, check=False),
            run(build / "v2t-test", "pixels", random_export, tmp_path / "crops.bin", 5, 2, 3, env=env, check=False),
            run(build / "v2t-test", "preprocess", random_export, tmp_path / "p.bin", videos, env=env, check=False),
            run(build / "v2t-test", "threads", random_export, videos, 3, env=env, check=False),
            run(build / "v2t-test", "sampling", random_export, videos, env=env, check=False),
            run(build / "v2t-test", "crops", random_export, tmp_path / "c.bin", *_test_images(tmp_path), env=env, check=False),
            run(build / "v2t-caption", random_export, "--list", videos, env=env, check=False)]
    for out in runs:
        assert out.returncode == 0 and "FAIL" not in out.stdout, out.stdout + out.stderr
        assert "Sanitizer" not in out.stderr and "runtime error" not in out.stderr, out.stderr

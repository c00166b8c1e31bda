"""Video input: `v2t make-table` and `v2t predict --videos` on small videos made here with PyAV."""
import base64
import io
import json
import os
import sys
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from conftest import TEST_SCHEMA, run_cli
from v2t_engine.video import decode as videos
from v2t_engine.errors import RowError
from v2t_engine.jobs.make_table import read_captions
from v2t_engine.video.rows import VideoRows, ordered_map
from v2t_engine.video.inputs import VideoInput, iter_inputs
from v2t_engine.video.decode import (FrameOptions, FramePicker, Sampling, frame_indices, frames_or_failure,
                               target_times)

av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")


# ---------------------------------------------------------------------------------------------
# Making videos


def index_image(i: int, width: int = 64, height: int = 48) -> np.ndarray:
    """A flat frame whose colour encodes i (0..255) coarsely enough to survive lossy codecs."""
    image = np.full((height, width, 3), 8, np.uint8)
    image[..., 0] = (i % 16) * 16 + 8
    image[..., 1] = (i // 16) * 16 + 8
    return image


def image_index(image: Image.Image) -> int:
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    return int(round((a[..., 0].mean() - 8) / 16)) + 16 * int(round((a[..., 1].mean() - 8) / 16))


def write_video(path, images, codec="libx264", rate=25, pts_ms=None, rotation=None, gop=None):
    """Encode RGB arrays; pts_ms gives each frame's time in milliseconds (variable frame rate),
    gop the distance between keyframes."""
    height, width = images[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if pts_ms is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, array in enumerate(images):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio(path, seconds=1.0):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(int(seconds * 16000 / 1024)):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def has_encoder(name: str) -> bool:
    return name in av.codecs_available


CODECS = [("mp4", "libx264", (98, 54)), ("mkv", "mpeg4", (63, 47)),
          pytest.param("webm", "libvpx-vp9", (65, 49), marks=pytest.mark.skipif(
              not has_encoder("libvpx-vp9"), reason="this PyAV build has no VP9 encoder"))]


def table_rows(path):
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def row_images(frames_field: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in json.loads(frames_field)]


def picked(path, **opts) -> list[int]:
    result = frames_or_failure(VideoInput(1, "v", str(path)), FrameOptions(**opts))
    assert not hasattr(result, "reason"), result
    return [image_index(row_images(json.dumps([f]))[0]) for f in result.frames]


# ---------------------------------------------------------------------------------------------
# Frame choice


@pytest.mark.parametrize("ext,codec,size", CODECS)
def test_uniform_sampling_takes_segment_centres_over_the_whole_video(tmp_path, ext, codec, size):
    video = write_video(tmp_path / f"v.{ext}", [index_image(i, *size) for i in range(50)], codec)  # 2 s
    # Targets 0.25, 0.75, 1.25, 1.75 s; frame i starts at i/25 s.
    assert picked(video, frames=4) == [6, 18, 31, 43]
    assert picked(video, frames=4, sampling=Sampling.parse("first")) == [0, 1, 2, 3]
    assert picked(video, sampling=Sampling.parse("fps:2")) == [0, 12, 25, 37]
    result = frames_or_failure(VideoInput(1, "v", str(video)), FrameOptions(frames=2))
    assert row_images(json.dumps(result.frames))[0].size == size  # odd sizes kept as decoded


def test_variable_frame_rate_picks_the_frame_on_screen(tmp_path):
    pts = [0, 30, 60, 400, 420, 1000, 1010, 1020, 1500, 1900]
    video = write_video(tmp_path / "vfr.mkv", [index_image(i) for i in range(len(pts))], pts_ms=pts)
    # Span ~[0, 1.94) s: targets ~0.24, 0.73, 1.21, 1.70 s show frames 2, 4, 7 and 8.
    assert picked(video, frames=4) == [2, 4, 7, 8]


def decode_with(video, seek: bool):
    """(frames decoded, indices picked) for uniform K=4, seeking to keyframes or not."""
    with av.open(str(video)) as container:
        span = videos._probe(av, container, container.streams.video[0])
    with av.open(str(video)) as container:
        picker = FramePicker(target_times(Sampling(), 4, span.start, span.end), 4,
                             convert=lambda f: image_index(f.to_image()))
        decoded = videos._decode(av, container, container.streams.video[0], picker, span, seek)
    return decoded, picker.finish()


@pytest.mark.parametrize("ext,codec", [("mp4", "libx264"), ("mkv", "mpeg4")])
def test_long_videos_seek_to_keyframes_and_pick_the_same_frames(tmp_path, ext, codec):
    video = write_video(tmp_path / f"long.{ext}", [index_image(i % 256, 32, 32) for i in range(500)],
                        codec, gop=10)  # 20 s; targets 2.5, 7.5, 12.5, 17.5 s
    expected = [62, 187, 312 % 256, 437 % 256]
    straight, seeking = decode_with(video, seek=False), decode_with(video, seek=True)
    assert straight == (439, expected) and seeking[1] == expected and seeking[0] < 60
    assert picked(video, frames=4) == expected


def test_short_video_repeats_frames_and_is_counted(tmp_path):
    video = write_video(tmp_path / "two.mp4", [index_image(i) for i in range(2)])
    assert picked(video, frames=4) == [0, 0, 1, 1]
    rows = VideoRows(str(video), FrameOptions(frames=4), workers=1)
    assert [r.idx for r in rows] == [str(video)] and rows.short == 1


def test_rotation_metadata_is_applied(tmp_path):
    image = np.zeros((32, 64, 3), np.uint8)
    image[:16] = (255, 0, 0)  # red top half
    video = write_video(tmp_path / "rot.mp4", [image] * 3, rotation=90)
    result = frames_or_failure(VideoInput(1, "r", str(video)), FrameOptions(frames=1, format="png"))
    upright = np.asarray(row_images(json.dumps(result.frames))[0].convert("RGB"))
    assert upright.shape[:2] == (64, 32)  # turned a quarter
    assert upright[:, :12, 0].mean() > 200 and upright[:, 20:, 0].mean() < 60  # top went left (CCW)


def test_size_shrinks_the_shorter_side_only(tmp_path):
    video = write_video(tmp_path / "v.mp4", [index_image(i, 98, 54) for i in range(5)])
    result = frames_or_failure(VideoInput(1, "v", str(video)), FrameOptions(frames=1, size=27))
    assert row_images(json.dumps(result.frames))[0].size == (49, 27)
    result = frames_or_failure(VideoInput(1, "v", str(video)), FrameOptions(frames=1, size=500))
    assert row_images(json.dumps(result.frames))[0].size == (98, 54)


def test_frame_choice_rules():
    assert target_times(Sampling(), 2, 1.0, 3.0) == [1.5, 2.5]
    assert target_times(Sampling.parse("fps:1"), None, 0.0, 2.5) == [0.0, 1.0, 2.0]
    assert target_times(Sampling.parse("fps:1"), 2, 0.0, 2.5) == [0.0, 1.0]
    assert frame_indices(Sampling(), 4, 8) == [1, 3, 5, 7]
    assert frame_indices(Sampling(), 4, 2) == [0, 0, 1, 1]
    picker = FramePicker([0.5, 0.6, 2.5], None, convert=lambda f: f)
    for t, frame in [(1.0, "a"), (2.0, "b")]:
        picker.offer(t, frame)
    assert picker.finish() == ["a", "a", "b"]  # before the first frame: the first; after: the last
    for bad in ("fps:0", "fps:x", "every"):
        with pytest.raises(Exception, match="sampling"):
            Sampling.parse(bad)


# ---------------------------------------------------------------------------------------------
# Inputs, ordering, errors


def make_bad_files(folder):
    good = write_video(folder / "good.mp4", [index_image(i) for i in range(10)])
    data = good.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    mkv = write_video(folder / "cut.mkv", [index_image(i) for i in range(50)], "mpeg4")
    mkv.write_bytes(mkv.read_bytes()[: mkv.stat().st_size // 2])
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "noise.webm").write_bytes(np.random.default_rng(0).bytes(3000))
    write_audio(folder / "audio.m4a")
    unknown = write_video(folder / "unknown.mkv", [index_image(i) for i in range(5)], "mpeg4")
    unknown.write_bytes(unknown.read_bytes().replace(b"V_MPEG4/ISO/ASP", b"V_ZZZZZ/ISO/ASP", 1))


EXPECTED_REASONS = {
    "audio.m4a": "no video stream (audio only)", "cut.mkv": "truncated", "empty.mp4": "empty (0 bytes)",
    "noise.webm": "not a readable video", "truncated.mp4": "not a readable video",
    "unknown.mkv": "unsupported video codec", "missing.mp4": "does not exist",
}


def read_errors(outputs):
    lines = (outputs.parent / (outputs.name + ".errors.tsv")).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "line\tidx\treason"
    return [line.split("\t") for line in lines[1:]]


def test_every_input_is_in_the_table_or_the_error_report(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    make_bad_files(folder)
    entries = sorted(p.name for p in folder.iterdir()) + ["missing.mp4"]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(folder / e) for e in entries) + "\n", encoding="utf-8")
    out = tmp_path / "t.txt"
    result = run_cli(["make-table", "--videos", listing, "--outputs", out, "--workers", 2, "--idx", "stem"],
                     expect_code=3)
    assert [r[0] for r in table_rows(out)] == ["good"]
    errors, failing = read_errors(out), [n for n in entries if n in EXPECTED_REASONS]
    assert [e[0] for e in errors] == [str(entries.index(n) + 1) for n in failing]  # line = position
    for (line, idx, reason), name in zip(errors, failing):
        assert idx == name.rsplit(".", 1)[0] and EXPECTED_REASONS[name] in reason and name in reason
    assert "7 inputs failed" in result.output and not (tmp_path / "t.txt.partial").exists()


def test_directory_walk_order_and_frame_folders(tmp_path):
    root = tmp_path / "clips"
    (root / "b" / "frames").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(index_image(i, 40, 30)).save(root / "b" / "frames" / f"{i:03d}.png")
    write_video(root / "b" / "z.mkv", [index_image(i) for i in range(10)], "mpeg4")
    write_video(root / "a.mp4", [index_image(i) for i in range(10)])
    (root / "cover.jpg").write_bytes(b"not shown: images next to videos are covers")
    (root / "notes.txt").write_text("passed over")
    assert [(i.ordinal, i.idx, i.is_frame_folder) for i in iter_inputs(str(root))] == [
        (1, "a.mp4", False), (2, "b/frames", True), (3, "b/z.mkv", False)]
    out = tmp_path / "t.txt"
    run_cli(["make-table", "--videos", root, "--outputs", out, "--workers", 2])
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["a.mp4", "b/frames", "b/z.mkv"]
    assert [image_index(im) for im in row_images(rows[1][1])] == [1, 3, 5, 7]  # uniform over 8 images


def test_names_a_table_cannot_hold_are_reported(tmp_path):
    video = write_video(tmp_path / "ok.mp4", [index_image(i) for i in range(3)])
    with open(os.fsencode(tmp_path) + b"/bad\xff.mp4", "wb") as f:
        f.write(video.read_bytes())
    (tmp_path / "tab\there.mp4").write_bytes(video.read_bytes())
    out = tmp_path / "out" / "t.txt"
    run_cli(["make-table", "--videos", tmp_path, "--outputs", out, "--workers", 1], expect_code=3)
    assert [r[0] for r in table_rows(out)] == ["ok.mp4"]
    assert [(e[1], e[2].split(": ")[-1]) for e in read_errors(out)] == [
        ("bad\ufffd.mp4", "its name is not valid UTF-8, which a table cannot hold"),
        ("tab here.mp4", "its name holds a tab or line break, which a table row cannot carry")]


def test_list_order_is_kept_and_captions_fill_the_text_column(tmp_path):
    names = [f"v{i}.mp4" for i in (3, 1, 2)]
    for i, name in enumerate(names):
        write_video(tmp_path / name, [index_image(10 * i + k) for k in range(6)])
    (tmp_path / "list.txt").write_text("".join(f"{tmp_path / n}\n" for n in names), encoding="utf-8")
    (tmp_path / "caps.tsv").write_text("v3\t三\nv1\t一\nv1\t壹\n", encoding="utf-8")
    out = tmp_path / "t.txt"
    run_cli(["make-table", "--videos", tmp_path / "list.txt", "--outputs", out, "--idx", "stem",
             "--captions", tmp_path / "caps.tsv", "--frames", 2, "--workers", 2], expect_code=3)
    assert [(r[0], r[2]) for r in table_rows(out)] == [("v3", "三"), ("v1", "一"), ("v1", "壹")]
    assert [e[1:] for e in read_errors(out)] == [["v2", f"no caption for it in {tmp_path / 'caps.tsv'}"]]
    assert read_captions(tmp_path / "caps.tsv")["v1"] == ["一", "壹"]


def _crash_on_three(n):
    if n == 3:
        os._exit(1)  # what a segfault in a decoder looks like to the pool
    return n * 10


def test_ordered_map_is_ordered_lazy_and_survives_a_crashing_worker():
    pulled = []

    def items():
        for n in range(8):
            pulled.append(n)
            yield n

    results = ordered_map(_crash_on_three, items(), workers=2, on_crash=lambda n: "crashed", window=3)
    first = next(results)
    assert first == (0, 0) and len(pulled) <= 4  # read as consumed, not up front
    assert list(results) == [(n, "crashed" if n == 3 else n * 10) for n in range(1, 8)]


def test_missing_pyav_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    result = run_cli(["make-table", "--videos", tmp_path, "--outputs", tmp_path / "t.txt"], expect_code=1)
    assert 'pip install "v2t[video]"' in result.output


# ---------------------------------------------------------------------------------------------
# predict --videos == make-table + predict


def synth_videos(folder):
    """Clips of the synthetic dataset's moving shapes, as real videos in three codecs."""
    from v2t_engine.jobs.synth import COLOURS, MOTIONS, SHAPES, make_clip

    rng = np.random.default_rng(7)
    formats = [("mp4", "libx264"), ("mkv", "mpeg4")] + ([("webm", "libvpx-vp9")] if has_encoder("libvpx-vp9") else [])
    for i in range(6):
        colour, shape, motion = list(COLOURS)[i % 5], list(SHAPES)[i % 4], MOTIONS[i % 7]
        clip = make_clip(rng, colour, shape, motion, frames=12, size=(64, 64))
        ext, codec = formats[i % len(formats)]
        write_video(folder / f"clip{i}.{ext}", [np.asarray(im) for im in clip], codec, rate=6)


def test_predict_on_videos_equals_predict_on_the_made_table(random_export, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    synth_videos(folder)
    (folder / "broken.mp4").write_bytes(b"\0\0\0\x18ftypmp42" + bytes(100))
    write_audio(folder / "voice.m4a")
    table, from_table, from_videos = tmp_path / "t.txt", tmp_path / "a.txt", tmp_path / "b.txt"
    run_cli(["make-table", "--videos", folder, "--outputs", table, "--workers", 2], expect_code=3)
    run_cli(["predict", "--tables", table, "--outputs", from_table, "--checkpoint_dir", random_export,
             "--input_schema", TEST_SCHEMA])
    run_cli(["predict", "--videos", folder, "--outputs", from_videos, "--checkpoint_dir", random_export,
             "--workers", 2], expect_code=3)
    assert from_videos.read_text(encoding="utf-8") == from_table.read_text(encoding="utf-8")
    assert len(table_rows(from_videos)) == 6
    assert read_errors(from_videos) == read_errors(table)
    assert [e[1] for e in read_errors(table)] == ["broken.mp4", "voice.m4a"]


def test_predict_videos_fail_mode_names_the_file(random_export, tmp_path):
    (tmp_path / "broken.mkv").write_bytes(b"garbage")
    result = run_cli(["predict", "--videos", tmp_path / "broken.mkv", "--outputs", tmp_path / "o.txt",
                      "--checkpoint_dir", random_export, "--on_error", "fail"], expect_code=1)
    assert "broken.mkv" in result.output and "not a readable video" in result.output
    assert not (tmp_path / "o.txt").exists()


def test_predict_needs_tables_or_videos(tmp_path):
    result = run_cli(["predict", "--outputs", tmp_path / "o.txt", "--checkpoint_dir", tmp_path], expect_code=2)
    assert "--tables or --videos" in result.output


def test_rows_are_the_table_fields(tmp_path):
    video = write_video(tmp_path / "a.mp4", [index_image(i) for i in range(6)])
    (row,) = list(VideoRows(str(video), FrameOptions(frames=3), column="frames", workers=1))
    assert not isinstance(row, RowError) and set(row.fields) == {"idx", "frames"}
    assert [image_index(im) for im in row_images(row.fields["frames"])] == [1, 3, 5]

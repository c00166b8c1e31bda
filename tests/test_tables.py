"""Table reading and frame decoding: the edge cases real EasyNLP tables contain."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import subprocess
import sys
import threading
import types
import zlib

import numpy as np
import pytest
from PIL import Image

from v2t_engine.errors import ConfigError, FrameError, RowError, TableError
from v2t_engine.inputs.frames import (FrameSource, decode_base64_frame, load_row_frames, open_image,
                               parse_frame_list, row_frames_or_error)
from v2t_engine.inputs.preprocess import crop_frame
from v2t_engine.inputs.tables import Column, InputSchema, TableRow, iter_tables, parse_line, read_table

SCHEMA = InputSchema.parse("idx:str:1,imgbase64:str:1,text:str:1")
S = 16  # crop size: small keeps the tests fast


def image_bytes(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def frames_field(*frames: bytes) -> str:
    return json.dumps([b64(f) for f in frames])


def png_with_declared_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims width x height (CRC fixed), as a hostile file would:
    the header says huge, the data is tiny, so only a header check can reject it cheaply."""
    data = bytearray(image_bytes(Image.new("RGB", (1, 1))))
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 21]))
    data[ihdr + 21:ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


# ---------------------------------------------------------------- schema and --tables


def test_schema_parse_names_and_positions():
    assert SCHEMA.columns[1] == Column("imgbase64", "str", 1)
    assert SCHEMA.names == ("idx", "imgbase64", "text")
    assert SCHEMA.position("text") == 2
    assert InputSchema.parse(" idx:str:1 , frames:str:1 ,").names == ("idx", "frames")
    with pytest.raises(ConfigError, match=r"'caption'.*idx,imgbase64,text"):
        SCHEMA.position("caption")


@pytest.mark.parametrize("text, message", [
    ("idx:str:1,imgbase64:str", "not name:type:count"),
    ("idx:str:1,:str:1", "not name:type:count"),
    ("idx:str:1,idx:str:1", "twice"),
    ("idx:bytes:1", "type 'bytes'"),
    ("idx:str:0", "count '0'"),
    ("idx:str:x", "count 'x'"),
    ("", "no columns"),
])
def test_schema_parse_rejects_malformed(text, message):
    with pytest.raises(ConfigError, match=message):
        InputSchema.parse(text)


def test_iter_tables_splits_easynlp_list():
    assert iter_tables(" a.txt, b.txt ,,") == ["a.txt", "b.txt"]
    with pytest.raises(ConfigError):
        iter_tables(" , ")


# ---------------------------------------------------------------- read_table


def write(tmp_path, content: bytes, name: str = "t.txt") -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def test_read_table_bom_crlf_blank_lines_extra_fields(tmp_path):
    content = ("\ufeffa\t[\"x\"]\t猫\r\n"
               "\r\n"
               "   \n"
               "b\t[\"y\"]\tdog\textra\r\n"
               "c\t[\"z\"]\t\n").encode("utf-8")
    rows = list(read_table(write(tmp_path, content), SCHEMA))
    assert all(isinstance(r, TableRow) for r in rows)
    assert [(r.line_no, r.idx) for r in rows] == [(1, "a"), (4, "b"), (5, "c")]  # physical lines
    assert rows[0].fields == {"idx": "a", "imgbase64": '["x"]', "text": "猫"}  # no BOM, no \r
    assert rows[1].fields["text"] == "dog"  # the extra trailing field is ignored
    assert rows[2].fields["text"] == ""  # an empty last field is a field


def test_read_table_short_row_is_a_row_error_and_reading_goes_on(tmp_path):
    path = write(tmp_path, b"a\t[]\ttext\nb\t[]\nc\t[]\tok\n")
    rows = list(read_table(path, SCHEMA))
    err = rows[1]
    assert isinstance(err, RowError)
    assert (err.line_no, err.idx) == (2, "b")
    assert "expected 3" in err.reason and "found 2" in err.reason
    assert isinstance(rows[2], TableRow) and rows[2].idx == "c"


def test_read_table_invalid_utf8_row_is_a_row_error(tmp_path):
    path = write(tmp_path, b"a\t[]\tok\nb\t[]\tbad \xff\xfe\nc\t[]\tok\n")
    rows = list(read_table(path, SCHEMA))
    assert [type(r) for r in rows] == [TableRow, RowError, TableRow]
    assert (rows[1].line_no, rows[1].idx) == (2, "b")
    assert "UTF-8" in rows[1].reason and "0xff" in rows[1].reason


def test_parse_line_matches_read_table(tmp_path):
    # A lazy reader seeks to a line and parses it alone; it must get what read_table yielded.
    content = "\ufeffa\t[]\tx\r\nb\t[]\n\nc\t[]\tz\n".encode()
    lines = content.splitlines(keepends=True)
    from_file = list(read_table(write(tmp_path, content), SCHEMA))
    alone = [parse_line(raw, n, SCHEMA) for n, raw in enumerate(lines, start=1)]
    assert alone[0] == from_file[0] and alone[3] == from_file[2] and alone[2] is None
    assert isinstance(alone[1], RowError) and str(alone[1]) == str(from_file[1])


def test_read_table_missing_file_fails_at_call_time(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(TableError, match="nope.txt"):
        read_table(missing, SCHEMA)  # no next(): the check is not deferred to iteration
    with pytest.raises(TableError, match="directory"):
        read_table(tmp_path, SCHEMA)


def test_read_table_is_lazy(tmp_path):
    # Everything after line 1 is garbage an eager reader (read().decode(), or a full parse)
    # would choke on; a streaming reader hands out row 1 first.
    path = write(tmp_path, b"a\t[]\tok\n" + b"\xff\xfe\x00garbage\n" * 1000)
    rows = read_table(path, SCHEMA)
    assert isinstance(rows, types.GeneratorType)
    first = next(rows)
    assert isinstance(first, TableRow) and first.idx == "a"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
def test_read_table_streams_from_a_pipe(tmp_path):
    # The writer only sends line 2 after the reader has handed out row 1: a reader that reads
    # the whole table before yielding would get row 1 only after the writer's timeout.
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    got_first = threading.Event()
    seen_in_time = []

    def writer():
        with open(fifo, "wb") as f:
            f.write(b"a\t[]\tone\n")
            f.flush()
            seen_in_time.append(got_first.wait(timeout=10))
            f.write(b"b\t[]\ttwo\n")

    thread = threading.Thread(target=writer)
    thread.start()
    rows = read_table(fifo, SCHEMA)
    assert next(rows).idx == "a"
    got_first.set()
    assert [r.idx for r in rows] == ["b"]
    thread.join()
    assert seen_in_time == [True]


# ---------------------------------------------------------------- frames field


@pytest.mark.parametrize("field, reason", [
    ("", "not a JSON list of strings"),
    ("not json", "not a JSON list of strings"),
    ('{"a": 1}', "not a JSON list of strings"),
    ('"abc"', "not a JSON list of strings"),
    ('["abc", 3]', "item 2 is a int"),
    ("[]", "frames list is empty"),
])
def test_parse_frame_list_rejects(field, reason):
    with pytest.raises(FrameError, match=reason):
        parse_frame_list(field)


def test_parse_frame_list_keeps_order():
    assert parse_frame_list('["b", "a", "c"]') == ["b", "a", "c"]


def test_decode_base64_alphabets_padding_whitespace_data_uri():
    data = b"\xfb\xff\xbf\xfe" * 10 + b"\x00"  # standard base64 full of + and /, needs padding
    standard = base64.b64encode(data).decode()
    urlsafe = base64.urlsafe_b64encode(data).decode()
    assert "+" in standard and "/" in standard and "-" in urlsafe and "_" in urlsafe
    assert standard.endswith("=")
    assert decode_base64_frame(standard) == data
    assert decode_base64_frame(urlsafe) == data
    assert decode_base64_frame(urlsafe.rstrip("=")) == data  # missing padding
    assert decode_base64_frame(base64.encodebytes(data).decode()) == data  # MIME line breaks
    assert decode_base64_frame("data:image/jpeg;base64," + standard) == data


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("====", "empty"),
    ("abc$def!", "invalid base64"),
    ("abcde", "invalid base64"),  # 5 characters: one is missing
    ("data:image/png,rawbytes", "not base64-encoded"),
])
def test_decode_base64_rejects(text, reason):
    with pytest.raises(FrameError, match=reason):
        decode_base64_frame(text)


# ---------------------------------------------------------------- open_image


def test_open_image_rejects_non_images_and_truncated_files():
    with pytest.raises(FrameError, match=r"not an image \(cannot identify image file\)"):
        open_image(b"hello, not an image", 10**6)
    jpeg = image_bytes(noise(64, 48), "JPEG", quality=90)
    with pytest.raises(FrameError, match="truncated image"):
        open_image(jpeg[: len(jpeg) // 2], 10**6)


def test_open_image_checks_pixels_before_decoding():
    # The PNG declares 9000x9000 but carries 1 pixel of data: decoding first would fail with a
    # decode error, so the size message proves the check comes first. 81 MP is under PIL's own
    # bomb threshold (~89 MP), so this is v2t's limit (default 50 MP) at work, not PIL's.
    with pytest.raises(FrameError, match="9000x9000 pixels exceeds the limit of 50000000"):
        open_image(png_with_declared_size(9000, 9000), FrameSource().max_image_pixels)
    with pytest.raises(FrameError, match="300x200 pixels exceeds the limit of 1000"):
        open_image(image_bytes(noise(300, 200)), 1000)


def test_open_image_decompression_bomb_is_a_frame_error():
    with pytest.raises(FrameError):  # PIL's DecompressionBombError (over ~179 MP)
        open_image(png_with_declared_size(20000, 20000), 10**12)


def test_open_image_returns_a_loaded_image():
    image = open_image(image_bytes(noise(20, 10)), 10**6)
    assert image.size == (20, 10)
    assert np.asarray(image).shape == (10, 20, 3)


# ---------------------------------------------------------------- load_row_frames


def test_load_row_frames_shape_and_content():
    frames = [noise(30, 20, seed=i) for i in range(3)]
    pixels, padded = load_row_frames(frames_field(*(image_bytes(f) for f in frames)), 3, S, FrameSource())
    assert pixels.shape == (3, 3, S, S) and pixels.dtype == np.uint8 and padded == 0
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(pixels[i], crop_frame(frame, S))


def test_load_row_frames_pads_short_rows_by_repeating_the_last_frame():
    a, b = noise(20, 20, seed=1), noise(20, 20, seed=2)
    pixels, padded = load_row_frames(frames_field(image_bytes(a), image_bytes(b)), 4, S, FrameSource())
    assert pixels.shape == (4, 3, S, S) and padded == 2
    np.testing.assert_array_equal(pixels[0], crop_frame(a, S))
    for i in (1, 2, 3):
        np.testing.assert_array_equal(pixels[i], crop_frame(b, S))


def test_load_row_frames_uses_and_decodes_only_the_first_frame_num():
    good = image_bytes(noise(20, 20))
    field = json.dumps([b64(good), b64(good), "!!! not base64, never decoded !!!"])
    pixels, padded = load_row_frames(field, 2, S, FrameSource())
    assert pixels.shape == (2, 3, S, S) and padded == 0


def test_load_row_frames_names_the_bad_frame():
    good = image_bytes(noise(20, 20))
    jpeg = image_bytes(noise(40, 30), "JPEG")
    with pytest.raises(FrameError, match="^frame 2: truncated image$"):  # cut in the header
        load_row_frames(frames_field(good, jpeg[:300], good), 3, S, FrameSource())
    with pytest.raises(FrameError, match="^frame 2: truncated image$"):  # cut in the pixel data
        load_row_frames(frames_field(good, jpeg[:-200], good), 3, S, FrameSource())
    with pytest.raises(FrameError, match=r"^frame 3: not an image"):
        load_row_frames(frames_field(good, good, b"GIF? no."), 3, S, FrameSource())
    with pytest.raises(FrameError, match="^frame 1: invalid base64"):
        load_row_frames(json.dumps(["@@@@"]), 1, S, FrameSource())
    with pytest.raises(ConfigError):
        load_row_frames(frames_field(good), 0, S, FrameSource())


def test_palette_alpha_and_grayscale_frames_become_rgb():
    # Palette PNG with a transparent entry: every pixel is palette colour 1.
    pal = Image.new("P", (24, 18), 1)
    pal.putpalette([0, 0, 0, 200, 30, 60] + [0] * 762)
    pal_png = image_bytes(pal, transparency=0)
    rgba = Image.new("RGBA", (18, 24), (10, 220, 90, 128))
    gray = noise(30, 20, mode="L")
    field = frames_field(pal_png, image_bytes(rgba), image_bytes(gray, "JPEG"))
    pixels, _ = load_row_frames(field, 3, S, FrameSource())
    assert pixels.shape == (3, 3, S, S)
    assert (pixels[0].reshape(3, -1).T == (200, 30, 60)).all()
    # Alpha dropped, colour kept; PIL resizes RGBA with premultiplied alpha, whose 8-bit
    # rounding may move a channel by one level.
    assert (np.abs(pixels[1].reshape(3, -1).T.astype(int) - (10, 220, 90)) <= 1).all()
    assert (pixels[2][0] == pixels[2][1]).all() and (pixels[2][1] == pixels[2][2]).all()
    assert pixels[2].std() > 10  # a real (noisy) grey image, not a constant


# ---------------------------------------------------------------- image-path mode


def test_image_path_mode_relative_absolute_and_missing(tmp_path, monkeypatch):
    root = tmp_path / "frames"
    (root / "clip1").mkdir(parents=True)
    a, b = noise(20, 20, seed=3), noise(20, 20, seed=4)
    a.save(root / "clip1" / "0.png")
    b.save(tmp_path / "abs.png")
    source = FrameSource(enable_img_path=True, img_root_dir=str(root), allow_outside_root=True)
    field = json.dumps(["clip1/0.png", str(tmp_path / "abs.png")])
    pixels, padded = load_row_frames(field, 2, S, source)
    np.testing.assert_array_equal(pixels[0], crop_frame(a, S))
    np.testing.assert_array_equal(pixels[1], crop_frame(b, S))

    row = TableRow(7, {"idx": "v7", "imgbase64": json.dumps(["clip1/0.png", "clip1/1.png"])})
    with pytest.raises(RowError) as info:
        row_frames_or_error(row, "imgbase64", 2, S, source)
    err = info.value
    assert (err.line_no, err.idx) == (7, "v7")
    assert err.reason.startswith("frame 2: image file not found") and "clip1/1.png" in err.reason

    # No img_root_dir: relative to the working directory, like any other tool.
    monkeypatch.chdir(root)
    pixels, _ = load_row_frames(json.dumps(["clip1/0.png"]), 1, S, FrameSource(enable_img_path=True))
    np.testing.assert_array_equal(pixels[0], crop_frame(a, S))


def test_image_paths_stay_inside_the_root_and_are_bounded(tmp_path):
    """Hostile image paths are row errors with a reason, read nothing unbounded, and never hang."""
    root = tmp_path / "frames"
    root.mkdir()
    noise(20, 20, seed=3).save(root / "ok.png")
    noise(20, 20, seed=4).save(tmp_path / "outside.png")
    os.mkfifo(root / "fifo")
    (root / "loop").symlink_to(root / "loop")
    (root / "out_link.png").symlink_to(tmp_path / "outside.png")
    with open(root / "huge.png", "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GB that take no disk
    source = FrameSource(enable_img_path=True, img_root_dir=str(root), max_image_bytes=1 << 20)
    cases = {
        str(tmp_path / "outside.png"): "leaves img_root_dir",
        "../outside.png": "leaves img_root_dir",
        "out_link.png": "leaves img_root_dir",
        "/dev/zero": "leaves img_root_dir",
        "fifo": "not a regular file",
        ".": "not a regular file",
        "loop": "cannot read image file",
        "huge.png": "3221225472 bytes, over the limit of 1048576 (max_image_bytes)",
    }
    for entry, reason in cases.items():
        with pytest.raises(FrameError, match=re.escape(reason)):
            load_row_frames(json.dumps([entry]), 1, S, source)
    outside_ok = FrameSource(enable_img_path=True, img_root_dir=str(root), allow_outside_root=True)
    with pytest.raises(FrameError, match="not a regular file"):
        load_row_frames(json.dumps(["/dev/zero"]), 1, S, outside_ok)
    load_row_frames(json.dumps(["ok.png", "../outside.png"]), 2, S, outside_ok)
    with pytest.raises(FrameError, match="over the limit of 100 .max_image_bytes."):
        load_row_frames(frames_field(image_bytes(noise(20, 20, seed=5))), 1, S, FrameSource(max_image_bytes=100))


def test_over_long_rows_are_row_errors_skipped_unread(tmp_path):
    schema = InputSchema.parse("idx:str:1,imgbase64:str:1")
    table = tmp_path / "t.txt"
    good = f"a\t{frames_field(image_bytes(noise(8, 8)))}\n"
    with open(table, "w", encoding="utf-8") as f:
        f.write(good)
        f.write("huge\t[\"" + "A" * 5_000_000 + "\"]\n")  # 5 MB line
        f.write(good.replace("a\t", "b\t"))
        f.write("tail\t" + "B" * 3_000_000)  # over-long last line without a line end
    rows = list(read_table(table, schema, max_row_bytes=1 << 20))
    assert [r.idx for r in rows] == ["a", "huge", "b", "tail"]
    assert [type(r).__name__ for r in rows] == ["TableRow", "RowError", "TableRow", "RowError"]
    assert rows[1].line_no == 2 and "longer than 1048576 bytes (max_row_bytes)" in rows[1].reason
    assert rows[3].line_no == 4
    with pytest.raises(ConfigError, match="max_row_bytes"):
        read_table(table, schema, max_row_bytes=0)


def test_a_row_listing_too_many_frames_is_a_row_error():
    frame = b64(image_bytes(noise(8, 8)))
    with pytest.raises(FrameError, match="10000 frames listed, over the limit of 1024 .max_row_frames."):
        load_row_frames(json.dumps([frame] * 10_000), 1, S, FrameSource())
    assert load_row_frames(json.dumps([frame] * 10_000), 1, S, FrameSource(max_row_frames=10_000))[0].shape[0] == 1


def test_frame_source_reads_its_user_parameters(tmp_path):
    source = FrameSource.from_user_parameters({"enable_img_path": "true", "img_root_dir": str(tmp_path),
                                               "allow_outside_root": "yes", "max_image_bytes": "1000"})
    assert source == FrameSource(enable_img_path=True, img_root_dir=str(tmp_path), allow_outside_root=True,
                                 max_image_bytes=1000)
    assert FrameSource.from_user_parameters({}) == FrameSource()
    with pytest.raises(ConfigError, match="max_image_bytes must be an integer"):
        FrameSource.from_user_parameters({"max_image_bytes": "lots"})


def test_frame_source_validation(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        FrameSource(enable_img_path=True, img_root_dir=str(tmp_path / "missing"))
    with pytest.raises(ConfigError):
        FrameSource(max_image_pixels=0)


def test_row_frames_or_error_wraps_frame_errors():
    row = TableRow(3, {"idx": "x", "imgbase64": "[]", "text": "t"})
    with pytest.raises(RowError) as info:
        row_frames_or_error(row, "imgbase64", 1, S, FrameSource())
    assert (info.value.line_no, info.value.idx, info.value.reason) == (3, "x", "frames list is empty")
    with pytest.raises(ConfigError, match="'frames'"):
        row_frames_or_error(row, "frames", 1, S, FrameSource())


def test_input_side_does_not_import_torch():
    code = ("import sys, v2t_engine.inputs.tables, v2t_engine.inputs.frames, v2t_engine.inputs.preprocess; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)

"""Property-based tests of everything that reads untrusted input: the table reader, the frames
field, base64 and image opening, image paths, and the video lister. The only outcomes allowed
are success or the module's domain error with a reason; any other exception is a bug.

Examples are bounded (a few seconds in all) and derandomized, so CI runs the same cases."""
import base64
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from v2t_engine.errors import ConfigError, FrameError, RowError
from v2t_engine.inputs.frames import FrameSource, decode_base64_frame, load_row_frames, open_image, parse_frame_list
from v2t_engine.inputs.tables import InputSchema, TableRow, parse_line, read_table
from v2t_engine.video.inputs import VideoInput, iter_inputs

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=30)  # each example builds files
SCHEMA = InputSchema.parse("idx:str:1,imgbase64:str:1,text:str:1")

# Bytes that matter to the table reader, mixed with anything else.
table_bytes = st.lists(st.one_of(st.sampled_from([b"\t", b"\n", b"\r\n", b"\r", b"\xef\xbb\xbf", b"\xff", b"\x00",
                                                  b"\xe4\xb8", b"[\"", b"\"]", b" "]),
                                 st.binary(max_size=40)), max_size=40).map(b"".join)


def png_bytes(width=6, height=5, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 120).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((16, 12), 40).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


GOOD_IMAGES = [png_bytes(), jpeg_bytes(), png_bytes(mode="P"), png_bytes(mode="LA")]


# ---------------------------------------------------------------------------------------------
# Tables


@FUZZ
@given(raw=table_bytes, line_no=st.integers(1, 3), end=st.sampled_from([b"", b"\n", b"\r\n"]))
def test_parse_line_gives_a_row_an_error_or_nothing(raw, line_no, end):
    raw = raw.replace(b"\n", b"") + end  # one physical line, as the reader hands it over
    row = parse_line(raw, line_no, SCHEMA)
    assert row is None or isinstance(row, (TableRow, RowError))
    if isinstance(row, RowError):
        assert row.reason and row.line_no == line_no
    if isinstance(row, TableRow):
        assert set(row.fields) == set(SCHEMA.names)
        assert all("\t" not in v and "\n" not in v for v in row.fields.values())


@FEW
@given(content=table_bytes, max_row_bytes=st.integers(1, 64))
def test_read_table_reads_any_bytes_line_by_line(content, max_row_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.txt"
        path.write_bytes(content)
        rows = list(read_table(path, SCHEMA, max_row_bytes=max_row_bytes))
    lines = content.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    assert all(isinstance(r, (TableRow, RowError)) for r in rows)
    numbers = [r.line_no for r in rows]
    assert numbers == sorted(set(numbers)) and all(1 <= n <= len(lines) for n in numbers)
    for row in rows:
        line = lines[row.line_no - 1]
        if len(line) > max_row_bytes:  # the line end does not count against the limit
            assert isinstance(row, RowError) and "max_row_bytes" in row.reason
        else:  # a line within the limit is parsed exactly as parse_line parses it alone
            assert same(row, parse_line(line, row.line_no, SCHEMA))


@FEW
@given(content=table_bytes)
def test_read_table_without_a_limit_is_parse_line_on_every_line(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.txt"
        path.write_bytes(content)
        rows = list(read_table(path, SCHEMA))
    expected = [parse_line(line, n, SCHEMA) for n, line in enumerate(content.split(b"\n"), start=1)]
    expected = [r for r in expected if r is not None]
    assert len(rows) == len(expected) and all(same(a, b) for a, b in zip(rows, expected))


def same(a, b) -> bool:
    """Rows are equal as values; RowErrors (exceptions compare by identity) by where and why."""
    if isinstance(a, RowError) and isinstance(b, RowError):
        return (a.line_no, a.idx, a.reason) == (b.line_no, b.idx, b.reason)
    return a == b


# ---------------------------------------------------------------------------------------------
# The frames field and base64

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=4), children, max_size=3), max_leaves=12)


@FUZZ
@given(field=st.one_of(st.text(max_size=60), json_values.map(json.dumps),
                       st.sampled_from([1, 50, 100_000]).map(lambda n: "[" * n + "]" * n),
                       st.lists(st.text(max_size=6), max_size=5).map(lambda v: json.dumps(v)[:-1])))
def test_parse_frame_list_gives_strings_or_a_reason(field):
    try:
        frames = parse_frame_list(field)
    except FrameError as err:
        assert str(err)
        return
    assert frames and all(isinstance(f, str) for f in frames)


base64ish = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_= \n\r\t:;,.é\x00",
                    max_size=80)


@FUZZ
@given(text=st.one_of(base64ish, st.text(max_size=40), base64ish.map(lambda t: "data:image/png;base64," + t),
                      base64ish.map(lambda t: "data:" + t)))
def test_base64_garbage_is_bytes_or_a_reason(text):
    try:
        data = decode_base64_frame(text)
    except FrameError as err:
        assert str(err)
        return
    assert isinstance(data, bytes) and data


@FUZZ
@given(data=st.binary(min_size=1, max_size=200), urlsafe=st.booleans(), strip=st.booleans(), wrap=st.booleans())
def test_base64_round_trips_in_every_accepted_spelling(data, urlsafe, strip, wrap):
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode("ascii")
    if strip:
        text = text.rstrip("=")
    if wrap:
        text = "\n".join(text[i:i + 16] for i in range(0, len(text), 16))
    assert decode_base64_frame(text) == data


# ---------------------------------------------------------------------------------------------
# Opening images


def _open_or_reason(data: bytes, max_pixels: int = 10_000):
    try:
        image = open_image(data, max_pixels)
    except FrameError as err:
        assert str(err)
        return None
    assert image.size[0] * image.size[1] <= max_pixels
    image.convert("RGB")  # what preprocessing does next also works
    return image


@FUZZ
@given(data=st.binary(max_size=300))
def test_open_image_on_garbage(data):
    _open_or_reason(data)


@FUZZ
@given(which=st.integers(0, len(GOOD_IMAGES) - 1), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4))
def test_open_image_on_truncated_and_damaged_images(which, cut, flips):
    data = bytearray(GOOD_IMAGES[which])
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    _open_or_reason(bytes(data[:int(cut * len(data))]))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@FUZZ
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1), fmt=st.sampled_from(["png", "gif", "bmp"]))
def test_images_declaring_huge_sizes_are_refused_before_decoding(width, height, fmt):
    """Headers that declare a size the bytes cannot hold (decompression-bomb-ish)."""
    import struct
    import zlib

    if fmt == "png":
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        chunk = b"IHDR" + ihdr
        data = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
                + struct.pack(">I", zlib.crc32(chunk)) + b"\0\0\0\0IEND\xaeB`\x82")
    elif fmt == "gif":
        data = b"GIF89a" + struct.pack("<HH", width & 0xFFFF, height & 0xFFFF) + b"\0\0\0;"
    else:
        data = (b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24,
                                                                          0, 16, 0, 0, 0, 0) + b"\0" * 16)
    _open_or_reason(data, max_pixels=1_000_000)


# ---------------------------------------------------------------------------------------------
# Image paths


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """A root with a good image, a sub-directory, a FIFO, a link loop, a link out, a sparse huge
    file, and an image outside it."""
    top = tmp_path_factory.mktemp("fuzz_paths")
    root = top / "root"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(png_bytes())
    (root / "sub" / "ok.png").write_bytes(png_bytes())
    (top / "outside.png").write_bytes(png_bytes())
    os.mkfifo(root / "fifo")
    (root / "loop").symlink_to(root / "loop")
    (root / "out").symlink_to(top / "outside.png")
    with open(root / "huge.png", "wb") as f:
        f.truncate(1 << 31)
    return root


path_parts = st.sampled_from(["ok.png", "sub", "..", ".", "fifo", "loop", "out", "huge.png", "outside.png", "",
                              "/dev/zero", "/", "nope", "\x00", "a" * 300, "é", "\udcff", "ok.png/x", "~"])


@FUZZ
@given(parts=st.lists(path_parts, min_size=1, max_size=4), outside=st.booleans())
def test_image_paths_are_frames_or_reasons(image_root, parts, outside):
    entry = "/".join(parts)
    source = FrameSource(enable_img_path=True, img_root_dir=str(image_root), allow_outside_root=outside,
                         max_image_bytes=1 << 20)
    try:
        frames, _ = load_row_frames(json.dumps([entry]), 1, 8, source)
    except FrameError as err:
        assert str(err).startswith("frame 1: ")
        return
    assert frames.shape == (1, 3, 8, 8)


# ---------------------------------------------------------------------------------------------
# The video lister

names = st.one_of(st.sampled_from(["a.mp4", "b.png", "c.txt", "d", ".hidden", "e.lock", "f.jpg", "sub", "x y.mkv",
                                   "tab\tname.mp4", "nl\nname", "é.webm"]),
                  st.binary(min_size=1, max_size=12).map(lambda b: os.fsdecode(b.replace(b"/", b"_").replace(b"\0", b"_"))))
list_lines = st.one_of(names, st.just("a" * 5000), st.just("sub"), st.just("/dev/zero"), st.just("nul\x00byte"),
                       st.binary(max_size=20).map(lambda b: b.decode("utf-8", "replace")))


@FEW
@given(files=st.lists(st.tuples(st.lists(names, min_size=1, max_size=3), st.binary(max_size=16)), max_size=8),
       listed=st.lists(list_lines, max_size=6), idx_style=st.sampled_from(["path", "stem"]))
def test_video_lister_yields_inputs_for_any_tree_and_list(files, listed, idx_style):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "videos"
        root.mkdir()
        for parts, content in files:
            path = root.joinpath(*parts)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            except OSError:
                continue  # a name the file system refuses, or a file where a directory is asked
        listing = Path(tmp) / "list.txt"
        listing.write_text("\n".join(listed), encoding="utf-8", errors="surrogateescape")
        for spec in (str(root), str(listing), f"{root},{listing}"):
            inputs = list(iter_inputs(spec, idx_style))
            assert [i.ordinal for i in inputs] == list(range(1, len(inputs) + 1))
            for item in inputs:
                assert isinstance(item, VideoInput)
                item.idx.encode("utf-8")  # always printable
                assert not any(c in item.idx for c in "\t\n\r")


@FUZZ
@given(spec=st.text(max_size=30) | st.just("x" * 5000), idx_style=st.text(max_size=5) | st.just("path"))
def test_video_lister_arguments_are_inputs_or_a_config_error(spec, idx_style):
    try:
        list(iter_inputs(spec, idx_style))
    except ConfigError as err:
        assert str(err)

"""Video files (or folders of frames) → the frames field of an EasyNLP table.

Three steps, each small:

- **listing** (`iter_inputs`): what `--videos` names, as `VideoInput`s in a fixed order, lazily;
- **frame choice** (`read_video`, `read_frame_folder`): decode with PyAV and keep K frames chosen
  by timestamp (or by position for a folder of images);
- **encoding** (`encode_frame`): optional shrink, JPEG/PNG, base64.

`frames_or_failure` runs the last two on one input and never raises: it is the function the
worker processes of `make_table.VideoRows` run, and its result is the same whether the row is
written by `v2t make-table` or captioned directly by `v2t predict --videos`.

PyAV (`av`) is an optional dependency (the `video` extra): it is imported only here, lazily, and
`require_av` turns its absence into an install hint.
"""
from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from .errors import ConfigError, FrameError, V2TError
from .frames import open_image

DEFAULT_FRAMES = 4  # frames per video when --frames is not given (uniform and first sampling)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
# Taken as videos without looking inside (any other file is sniffed: text is a list of paths).
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".wmv", ".flv", ".mpg",
                            ".mpeg", ".ts", ".mts", ".m2ts", ".vob", ".3gp", ".ogv", ".gif", ".y4m"})
# Text files: a --videos file with one of these suffixes is a list of paths, and a directory walk
# passes them over (captions, lists, our own .partial/.errors.tsv outputs) instead of reporting
# them as broken videos.
TEXT_SUFFIXES = frozenset({".txt", ".lst", ".list", ".tsv", ".csv", ".json", ".jsonl", ".md",
                           ".srt", ".vtt", ".log", ".partial", ".yaml", ".yml", ".xml"})
# A video stream whose frames end before this share of its declared duration is truncated.
TRUNCATED_BELOW = 0.9


class VideoError(V2TError):
    """One input cannot give frames; the reason names what is wrong, not where (the caller
    reports the path and idx)."""


class MissingDependencyError(V2TError):
    """PyAV is not installed."""


def require_av():
    """The `av` module, or an error telling how to install it."""
    try:
        import av
    except ImportError:
        raise MissingDependencyError(
            'reading videos needs PyAV, which is not installed: pip install "v2t[video]" '
            "(or pip install av; its wheel bundles FFmpeg)") from None
    return av


# ---------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class Sampling:
    """Which frames a video gives: ``uniform`` (the default), ``first``, or ``fps:N``."""

    mode: str = "uniform"
    fps: float | None = None

    @classmethod
    def parse(cls, text: str) -> Sampling:
        text = text.strip().lower()
        if text in ("uniform", "first"):
            return cls(text)
        if text.startswith("fps:"):
            try:
                fps = float(text[4:])
            except ValueError:
                fps = 0.0
            if not (fps > 0 and math.isfinite(fps)):
                raise ConfigError(f"sampling {text!r}: N in fps:N must be a positive number")
            return cls("fps", fps)
        raise ConfigError(f"sampling {text!r} is not uniform, first or fps:N")

    def __str__(self) -> str:
        return f"fps:{self.fps:g}" if self.mode == "fps" else self.mode


@dataclass(frozen=True)
class FrameOptions:
    """How frames are chosen and encoded. Picklable: it travels to the worker processes.

    frames: K. None means DEFAULT_FRAMES for uniform/first sampling and no limit for fps:N.
    size: shrink frames so the shorter side is `size` (never enlarge); None keeps them as decoded.
    """

    frames: int | None = None
    sampling: Sampling = Sampling()
    size: int | None = None
    format: str = "jpeg"
    quality: int = 90
    max_pixels: int = 50_000_000  # per frame; as FrameSource.max_image_pixels for tables

    def __post_init__(self) -> None:
        if self.frames is not None and self.frames < 1:
            raise ConfigError(f"frames must be at least 1, got {self.frames}")
        if self.size is not None and self.size < 1:
            raise ConfigError(f"size must be positive, got {self.size}")
        if self.format not in ("jpeg", "png"):
            raise ConfigError(f"format must be jpeg or png, got {self.format!r}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"quality must be between 1 and 100, got {self.quality}")

    @property
    def count(self) -> int | None:
        """K, or None for "every sampled frame" (fps:N without --frames)."""
        if self.frames is not None:
            return self.frames
        return None if self.sampling.mode == "fps" else DEFAULT_FRAMES


# ---------------------------------------------------------------------------------------------
# Listing


@dataclass(frozen=True)
class VideoInput:
    ordinal: int  # 1-based position among all inputs: the "line" of error reports
    idx: str  # always printable as UTF-8 (see `bad_name`)
    path: str
    is_frame_folder: bool = False
    bad_name: str | None = None  # why the name cannot be a table's idx, if it cannot


def iter_inputs(spec: str, idx_style: str = "path") -> Iterator[VideoInput]:
    """Every input named by `--videos`, lazily, in a deterministic order.

    `spec` is one path or several separated by commas (as `--tables`). Each is a directory
    (walked recursively in sorted order; a directory holding only images is one video whose
    frames are those images, sorted by name), a list file (a TEXT_SUFFIXES file, or any UTF-8
    text file: one path per line, relative paths taken from the current directory, read lazily),
    or a video file. idx is the path relative to the walked directory, or the path as written in
    the list or on the command line; with ``idx_style="stem"`` it is the name without extension.
    A path that does not exist is still yielded: reading it fails and that failure is reported.
    """
    if idx_style not in ("path", "stem"):
        raise ConfigError(f"idx style must be path or stem, got {idx_style!r}")
    return _inputs(_parts(spec), idx_style)


def _inputs(parts: list[str], idx_style: str) -> Iterator[VideoInput]:
    ordinal = 0
    for part in parts:
        for idx, path, is_folder in _expand(part):
            ordinal += 1
            if idx_style == "stem":
                idx = Path(idx).name if is_folder else Path(idx).stem
            yield VideoInput(ordinal, printable(idx), path, is_folder, _name_problem(idx))


def printable(name: str) -> str:
    """`name` as a table field can hold it: bytes that are not UTF-8 (kept by Python as
    surrogates) become U+FFFD and tabs and line breaks spaces, so the name can still be shown and
    reported."""
    name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return name.translate(_FIELD_BREAKERS)


_FIELD_BREAKERS = str.maketrans("\t\n\r", "   ")


def _name_problem(idx: str) -> str | None:
    if any(c in idx for c in "\t\n\r"):
        return "its name holds a tab or line break, which a table row cannot carry"
    if printable(idx) != idx:
        return "its name is not valid UTF-8, which a table cannot hold"
    return None


def _parts(spec: str) -> list[str]:
    if Path(spec.strip()).exists():
        return [spec.strip()]  # a name that holds a comma
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"--videos {spec!r} names no path")
    return parts


def count_inputs(spec: str) -> int | None:
    """How many inputs `iter_inputs(spec)` gives, without reading any video (for a progress
    bar's total: a walk of the directories and a byte scan of the lists); None if that fails."""
    total = 0
    try:
        for part in _parts(spec):
            path = Path(part)
            if path.is_dir():
                total += sum(1 for _ in _walk(path, path))
            elif path.is_file() and _is_list_file(path):
                with open(path, "rb") as f:
                    total += sum(1 for line in f if line.strip())
            else:
                total += 1
    except OSError:
        return None
    return total


def _expand(part: str) -> Iterator[tuple[str, str, bool]]:
    """(idx, path, is_frame_folder) for one `--videos` path."""
    path = Path(part)
    if path.is_dir():
        yield from _walk(path, path)
    elif path.is_file() and _is_list_file(path):
        yield from _list_entries(path)
    else:
        yield part, part, False  # a video, or a missing path reported when it is read


def _is_list_file(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return True
    if suffix in VIDEO_SUFFIXES or suffix in IMAGE_SUFFIXES or path.stat().st_size == 0:
        return False
    # No telling suffix: a list is UTF-8 text without NUL bytes; a video never is.
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut by the 4 KiB window
            return False
    return b"\0" not in head


def _list_entries(list_path: Path) -> Iterator[tuple[str, str, bool]]:
    # surrogateescape: a listed name that is not UTF-8 still reaches the file system as its
    # bytes, and is reported (bad_name) instead of ending the job.
    with open(list_path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for line in f:  # streamed: a list of a million paths is never held whole
            entry = line.strip()
            if entry:
                yield entry, entry, Path(entry).is_dir()


def _walk(root: Path, top: Path) -> Iterator[tuple[str, str, bool]]:
    """Depth-first, each directory's entries sorted by name; only one directory's listing is
    held at a time."""
    with os.scandir(top) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    kinds = {e.name: _kind(e) for e in entries}
    if "image" in kinds.values() and "video" not in kinds.values():
        rel = top.relative_to(root).as_posix()
        yield (root.name if rel == "." else rel), str(top), True
    for entry in entries:
        if kinds[entry.name] == "dir":
            yield from _walk(root, Path(entry.path))
        elif kinds[entry.name] == "video":
            yield Path(entry.path).relative_to(root).as_posix(), entry.path, False
    # Images next to videos are covers or thumbnails, not videos: left out of the walk.


def _kind(entry: os.DirEntry) -> str:
    """dir, image, text (passed over) or video (any other file: what it really is shows when
    it is read, and a broken one is reported rather than silently skipped)."""
    if entry.is_dir(follow_symlinks=False):
        return "dir"  # links to directories are not followed: a link cycle cannot loop the walk
    if not entry.is_file():
        return "other"  # sockets, fifos, broken links
    suffix = Path(entry.name).suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "text" if suffix in TEXT_SUFFIXES else "video"


# ---------------------------------------------------------------------------------------------
# Frame choice


def target_times(sampling: Sampling, count: int | None, start: float, end: float) -> list[float] | None:
    """The times (seconds) whose on-screen frames are kept; None for "the first `count` frames".

    uniform: the centres of `count` equal segments of [start, end), so the picks spread over the
    whole video and never sit on its first or last instant. fps:N: start, start + 1/N, ... while
    before `end`, at most `count` of them."""
    if sampling.mode == "first":
        return None
    span = max(end - start, 0.0)
    if sampling.mode == "uniform":
        return [start + (i + 0.5) * span / count for i in range(count)]
    n = max(1, math.ceil(span * sampling.fps - 1e-9))
    if count is not None:
        n = min(n, count)
    return [start + j / sampling.fps for j in range(n)]


class FramePicker:
    """Takes decoded frames in presentation order and keeps, for each target time, the frame on
    screen then: the last one that starts at or before it (the first frame for targets before
    the first frame, the last frame for targets after the end). Frames are converted with
    `convert` as soon as they are picked, so memory holds K converted frames, not the video."""

    def __init__(self, targets: list[float] | None, count: int | None, convert: Callable):
        self.targets = targets
        self.count = count
        self.convert = convert
        self.picked: list = []
        self._prev = None  # (frame, converted or None)

    @property
    def done(self) -> bool:
        if self.targets is None:
            return self.count is not None and len(self.picked) >= self.count
        return len(self.picked) >= len(self.targets)

    def offer(self, time: float, frame) -> None:
        if self.targets is None:
            self.picked.append(self.convert(frame))
            return
        current = [frame, None]
        while not self.done and self.targets[len(self.picked)] < time:
            self.picked.append(self._take(self._prev or current))
        self._prev = current

    def finish(self) -> list:
        while not self.done and self.targets is not None and self._prev is not None:
            self.picked.append(self._take(self._prev))
        return self.picked

    def _take(self, prev: list):
        if prev[1] is None:  # convert once even when several targets pick the same frame
            prev[1] = self.convert(prev[0])
        return prev[1]


def frame_indices(sampling: Sampling, count: int | None, n: int) -> list[int]:
    """`target_times` for a folder of n images taken as frames 0..n-1 one time unit apart."""
    if sampling.mode == "fps":
        raise VideoError("fps:N sampling needs timestamps and a folder of images has none; "
                         "use --sampling uniform or first")
    if sampling.mode == "first":
        return list(range(min(n, count)))
    return [min(n - 1, int(t)) for t in target_times(sampling, count, 0.0, float(n))]


@dataclass
class Frames:
    """What one input gave: the chosen frames (PIL RGB) and how many frames it had (fewer than K
    means some of the chosen frames repeat)."""

    images: list
    available: int


def read_frame_folder(folder: str, opts: FrameOptions) -> Frames:
    paths = sorted(p for p in Path(folder).iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not paths:
        raise VideoError("folder holds no images (list video files one by one, or give the folder itself to --videos)")
    images = []
    for i in frame_indices(opts.sampling, opts.count, len(paths)):
        try:
            image = open_image(paths[i].read_bytes(), opts.max_pixels)
        except (FrameError, OSError) as err:
            raise VideoError(f"frame {paths[i].name!r}: {err}") from None
        images.append(ImageOps.exif_transpose(image).convert("RGB"))  # camera orientation applied
    return Frames(images, len(paths))


def read_video(path: str, opts: FrameOptions) -> Frames:
    """Decode `path` and keep the frames `opts` asks for.

    Two passes over the file: the first reads packets only (no decoding, cheap) to learn the
    real time span of the video stream, which metadata can get wrong or leave out (VFR files,
    WebM, truncated files); the second decodes until the last target is passed."""
    av = require_av()
    _check_file(path)
    with _open(av, path) as container:
        span = _probe(av, container, _video_stream(container))
    with _open(av, path) as container:
        stream = _video_stream(container)
        picker = FramePicker(target_times(opts.sampling, opts.count, span.start, span.end), opts.count,
                             lambda f: _to_image(f, stream, opts))
        if _decode(av, container, stream, picker, span) == 0:
            raise VideoError("no frame could be decoded")
    return Frames(picker.finish(), span.packets)


def _check_file(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise VideoError("does not exist")
    if p.is_dir():
        raise VideoError("is a directory holding no images")
    if p.stat().st_size == 0:
        raise VideoError("is empty (0 bytes)")


def _open(av, path: str):
    try:
        return av.open(path, metadata_errors="ignore")
    except av.error.FFmpegError as err:
        if isinstance(err, av.error.EOFError):
            raise VideoError("truncated or empty container (FFmpeg: end of file while reading "
                             "the header)") from None
        raise VideoError(f"not a readable video (FFmpeg: {_ffmpeg_message(err)})") from None
    except OSError as err:
        raise VideoError(f"cannot read ({err.strerror or err})") from None


def _ffmpeg_message(err) -> str:
    return getattr(err, "strerror", None) or str(err)


def _video_stream(container):
    """The first real video stream: a cover picture attached to an audio file is not a video."""
    cover = 1024  # AV_DISPOSITION_ATTACHED_PIC
    videos = [s for s in container.streams.video if not int(s.disposition) & cover]
    if not videos:
        kinds = sorted({s.type for s in container.streams})
        what = "audio only" if "audio" in kinds else f"streams: {', '.join(kinds) or 'none'}"
        raise VideoError(f"no video stream ({what})")
    if videos[0].codec_context is None:
        raise VideoError("unsupported video codec (this FFmpeg build has no decoder for it)")
    return videos[0]


@dataclass(frozen=True)
class _Span:
    start: float  # seconds
    end: float
    rate: float  # frames per second, for frames without timestamps
    packets: int  # frames in the stream


def _probe(av, container, stream) -> _Span:
    """The video stream's time span from its packets' timestamps."""
    rate = float(stream.guessed_rate or stream.average_rate or 25)
    tb = stream.time_base
    start = end = None
    packets = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the empty packet PyAV yields at the end of the file
            packets += 1
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                continue
            t0 = float(ts * tb)
            t1 = t0 + (float(packet.duration * tb) if packet.duration else 1.0 / rate)
            start = t0 if start is None else min(start, t0)
            end = t1 if end is None else max(end, t1)
    except av.error.FFmpegError as err:
        raise VideoError(f"corrupt or truncated (FFmpeg: {_ffmpeg_message(err)} after "
                         f"{packets} packets)") from None
    if packets == 0:
        raise VideoError("zero-length video (its video stream has no frames)")
    if start is None:  # no timestamps at all: assume a constant rate
        start, end = 0.0, packets / rate
    declared = _declared_duration(container, stream)
    if declared and end - start < TRUNCATED_BELOW * declared:
        raise VideoError(f"truncated: its frames end at {end - start:.2f} s but it declares "
                         f"{declared:.2f} s")
    return _Span(start, end, rate, packets)


def _declared_duration(container, stream) -> float | None:
    """The video stream's duration as the file states it (stream header, Matroska's DURATION
    tag, or the container's when it holds nothing else), in seconds."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag:
        try:
            h, m, s = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)
        except ValueError:
            pass
    if len(container.streams) == 1 and container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _decode(av, container, stream, picker: FramePicker, span: _Span) -> int:
    """Feed decoded frames to `picker` until it is done; returns how many frames were decoded.
    A decoding error fails the video: a damaged file is reported, not captioned in part."""
    n = 0
    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                time = frame.time if frame.pts is not None else span.start + n / span.rate
                n += 1
                picker.offer(time, frame)
                if picker.done:
                    return n
    except av.error.FFmpegError as err:
        raise VideoError(f"corrupt or truncated (FFmpeg: {_ffmpeg_message(err)} after "
                         f"{n} decoded frames)") from None
    return n


def _to_image(frame, stream, opts: FrameOptions) -> Image.Image:
    """A decoded frame as an upright RGB image, shrunk if asked."""
    if frame.width * frame.height > opts.max_pixels:
        raise VideoError(f"{frame.width}x{frame.height} frames exceed the limit of {opts.max_pixels} pixels")
    image = frame.to_image()  # RGB
    return shrink(_upright(image, _rotation(frame, stream)), opts.size)


def _rotation(frame, stream) -> int:
    """Counter-clockwise degrees to turn the frame to display it (the display matrix)."""
    rotation = getattr(frame, "rotation", None)  # PyAV >= 14 reads the display matrix
    if rotation is None:
        rotation = -int(float(stream.metadata.get("rotate", 0) or 0))  # older: clockwise tag
    return int(round(rotation)) % 360


def _upright(image: Image.Image, ccw_degrees: int) -> Image.Image:
    exact = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
             270: Image.Transpose.ROTATE_270}
    if ccw_degrees == 0:
        return image
    if ccw_degrees in exact:
        return image.transpose(exact[ccw_degrees])
    return image.rotate(ccw_degrees, resample=Image.Resampling.BICUBIC, expand=True)


def shrink(image: Image.Image, size: int | None) -> Image.Image:
    """Shrink so the shorter side is `size` (aspect kept, bicubic); smaller images are kept."""
    if size is None or min(image.size) <= size:
        return image
    w, h = image.size
    new = (size, max(1, round(h * size / w))) if w <= h else (max(1, round(w * size / h)), size)
    return image.resize(new, Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------------------
# Encoding and the worker entry point


def encode_frame(image: Image.Image, opts: FrameOptions) -> str:
    buf = io.BytesIO()
    if opts.format == "jpeg":
        image.save(buf, "JPEG", quality=opts.quality)
    else:
        image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class EncodedFrames:
    frames: list[str]  # base64 images in time order
    available: int  # frames the input had; fewer than K means repeated frames


@dataclass(frozen=True)
class Failure:
    reason: str


def frames_or_failure(item: VideoInput, opts: FrameOptions) -> EncodedFrames | Failure:
    """Read, choose and encode one input's frames. Never raises: whatever goes wrong becomes a
    Failure with a reason, so one bad file cannot stop a job."""
    if item.bad_name:
        return Failure(item.bad_name)
    try:
        read = read_frame_folder if item.is_frame_folder else read_video
        frames = read(item.path, opts)
        return EncodedFrames([encode_frame(im, opts) for im in frames.images], frames.available)
    except (VideoError, MissingDependencyError) as err:
        return Failure(str(err))
    except Exception as err:  # noqa: BLE001 - PyAV/PIL raise many types on hostile files
        return Failure(f"unexpected error ({type(err).__name__}: {err})")

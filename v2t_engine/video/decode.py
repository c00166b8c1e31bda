"""Video files (or folders of frames) → the frames field of an EasyNLP table.

Three steps, each small:

- **listing** (`video_inputs.iter_inputs`): what `--videos` names, in a fixed order, lazily;
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
import bisect
import io
import math
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from ..errors import ConfigError, FrameError, MissingDependencyError, V2TError, import_optional
from ..inputs.frames import open_image
from .inputs import IMAGE_SUFFIXES, VideoInput

DEFAULT_FRAMES = 4  # frames per video when --frames is not given (uniform and first sampling)
# A video stream whose frames end before this share of its declared duration is truncated.
TRUNCATED_BELOW = 0.9


class VideoError(V2TError):
    """One input cannot give frames; the reason names what is wrong, not where (the caller
    reports the path and idx)."""


def require_av():
    """The `av` module (PyAV), or MissingDependencyError telling how to install it."""
    return import_optional("av", "reading videos", 'pip install "v2t[video]" (PyAV; its wheel bundles FFmpeg)')


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
    max_video_bytes, max_video_seconds: a video file larger, or longer, is refused before any
        frame is decoded: the size from the file system, the duration from the container's header
        (a stream that declares none is read only up to the limit).
    max_image_bytes: largest image of a folder of frames, as FrameSource.max_image_bytes.
    """

    frames: int | None = None
    sampling: Sampling = Sampling()
    size: int | None = None
    format: str = "jpeg"
    quality: int = 90
    max_pixels: int = 50_000_000  # per frame; as FrameSource.max_image_pixels for tables
    max_video_bytes: int = 20_000_000_000
    max_video_seconds: float = 6 * 3600
    max_image_bytes: int = 50_000_000

    def __post_init__(self) -> None:
        for key in ("max_pixels", "max_video_bytes", "max_video_seconds", "max_image_bytes"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a positive number, got {value}")
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

    @property
    def next_target(self) -> float | None:
        """The earliest target not yet resolved (None in "first" mode or when done)."""
        if self.targets is None or self.done:
            return None
        return self.targets[len(self.picked)]

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
    try:
        paths = sorted(p for p in Path(folder).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    except OSError as err:
        raise VideoError(f"cannot list the folder ({err.strerror or err})") from None
    if not paths:
        raise VideoError("folder holds no images (list video files one by one, or give the folder itself to --videos)")
    images = []
    for i in frame_indices(opts.sampling, opts.count, len(paths)):
        try:
            image = open_image(_read_capped(paths[i], opts.max_image_bytes), opts.max_pixels)
        except (FrameError, OSError) as err:
            raise VideoError(f"frame {paths[i].name!r}: {err}") from None
        images.append(ImageOps.exif_transpose(image).convert("RGB"))  # camera orientation applied
    return Frames(images, len(paths))


def _read_capped(path: Path, limit: int) -> bytes:
    """A regular file's bytes, FrameError when it holds more than `limit` (never read whole)."""
    with open(path, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise FrameError("not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FrameError(f"over the limit of {limit} bytes (max_image_bytes)")
    return data


def read_video(path: str, opts: FrameOptions) -> Frames:
    """Decode `path` and keep the frames `opts` asks for.

    Two passes over the file: the first reads packets only (no decoding, cheap) to learn the
    real time span of the video stream, which metadata can get wrong or leave out (VFR files,
    WebM, truncated files), and where its keyframes are; the second decodes until the last
    target is passed, jumping to the keyframe before a target when that skips enough of the
    video (decoding from a keyframe gives the frames a straight decode gives)."""
    av = require_av()
    _check_file(path, opts.max_video_bytes)
    with _open(av, path) as container:
        stream = _video_stream(container)
        _check_duration(container, stream, opts.max_video_seconds)
        span = _probe(av, container, stream, opts.max_video_seconds)
    try:
        return _read_frames(av, path, opts, span, seek=True)
    except _SeekFailed:
        # A demuxer that cannot land on the keyframe asked for: decode straight through.
        return _read_frames(av, path, opts, span, seek=False)


def _read_frames(av, path: str, opts: FrameOptions, span: _Span, seek: bool) -> Frames:
    with _open(av, path) as container:
        stream = _video_stream(container)
        picker = FramePicker(target_times(opts.sampling, opts.count, span.start, span.end), opts.count,
                             lambda f: _to_image(f, stream, opts))
        if _decode(av, container, stream, picker, span, seek) == 0:
            raise VideoError("no frame could be decoded")
    return Frames(picker.finish(), span.packets)


def _check_file(path: str, max_bytes: int) -> None:
    """Refuse, from the file system alone, what must not be opened: nothing there, a directory,
    a device or FIFO (FFmpeg would read /dev/zero or wait on a FIFO forever), an empty file, a
    file over max_video_bytes."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise VideoError("does not exist") from None
    except (OSError, ValueError) as err:
        raise VideoError(f"cannot read ({getattr(err, 'strerror', None) or err})") from None
    if stat.S_ISDIR(info.st_mode):
        raise VideoError("is a directory holding no images")
    if not stat.S_ISREG(info.st_mode):
        raise VideoError("is not a regular file (a device, FIFO or socket)")
    if info.st_size == 0:
        raise VideoError("is empty (0 bytes)")
    if info.st_size > max_bytes:
        raise VideoError(f"has {info.st_size} bytes, over the limit of {max_bytes} (max_video_bytes)")


def _check_duration(container, stream, max_seconds: float) -> None:
    """The duration the header declares (the video stream's, else the container's) against
    max_video_seconds, before any packet is read."""
    declared = _declared_duration(container, stream)
    if declared is None and container.duration:
        declared = container.duration / 1_000_000  # AV_TIME_BASE
    if declared is not None and declared > max_seconds:
        raise VideoError(f"declares {declared:.0f} s, over the limit of {max_seconds:g} s (max_video_seconds)")


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
    keyframes: tuple[tuple[float, int], ...] = ()  # (seconds, pts), in time order


def _probe(av, container, stream, max_seconds: float = math.inf) -> _Span:
    """The video stream's time span from its packets' timestamps. Reading stops with a
    VideoError once the span passes `max_seconds` (a header that declares no duration, or the
    wrong one, cannot make it read on)."""
    rate = float(stream.guessed_rate or stream.average_rate or 25)
    tb = stream.time_base
    start = end = None
    packets = 0
    keyframes = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the empty packet PyAV yields at the end of the file
            packets += 1
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                if start is None and packets / rate > max_seconds:
                    raise _past_limit(max_seconds)
                continue
            t0 = float(ts * tb)
            if packet.is_keyframe and packet.pts is not None:
                keyframes.append((t0, packet.pts))
            t1 = t0 + (float(packet.duration * tb) if packet.duration else 1.0 / rate)
            start = t0 if start is None else min(start, t0)
            end = t1 if end is None else max(end, t1)
            if end - start > max_seconds:
                raise _past_limit(max_seconds)
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
    return _Span(start, end, rate, packets, tuple(sorted(keyframes)))


def _past_limit(max_seconds: float) -> VideoError:
    return VideoError(f"runs past the limit of {max_seconds:g} s (max_video_seconds); read no further")


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


# Jump ahead only when it skips at least this much video: a seek flushes the decoder.
SEEK_MIN_SKIP = 1.0  # seconds


class _SeekFailed(Exception):
    """A seek did not land where the keyframe index says it should."""


def _decode(av, container, stream, picker: FramePicker, span: _Span, seek: bool) -> int:
    """Feed decoded frames to `picker` until it is done; returns how many frames were decoded.
    A decoding error fails the video: a damaged file is reported, not captioned in part."""
    n, landing = 0, None  # landing: the keyframe just sought to
    frames = _frames(container, stream, span)
    try:
        while not picker.done and (item := next(frames, None)) is not None:
            time, frame = item
            if landing is not None:
                if time < landing[0]:
                    continue  # leading frames of an open GOP: they belong before the keyframe
                if time > picker.next_target:
                    raise _SeekFailed  # it skipped the frame on screen at the target
                landing = None
            n += 1
            picker.offer(time, frame)
            jump = _keyframe_ahead(span.keyframes, picker.next_target, time) if seek else None
            if jump is not None:
                frames.close()
                container.seek(jump[1], stream=stream, backward=True)
                frames, landing = _frames(container, stream, span), jump
    except av.error.FFmpegError as err:
        raise VideoError(f"corrupt or truncated (FFmpeg: {_ffmpeg_message(err)} after "
                         f"{n} decoded frames)") from None
    return n


def _frames(container, stream, span: _Span) -> Iterator[tuple[float, object]]:
    """(seconds, frame) in presentation order from the demuxer's current position."""
    n = 0
    for packet in container.demux(stream):
        for frame in packet.decode():
            yield (frame.time if frame.pts is not None else span.start + n / span.rate), frame
            n += 1


def _keyframe_ahead(keyframes, target: float | None, now: float) -> tuple[float, int] | None:
    """The last keyframe at or before `target`, if it lies far enough past `now` to be worth a
    seek (the frame on screen at `target` is then decoded from it)."""
    if target is None or not keyframes:
        return None
    i = bisect.bisect_right(keyframes, (target, math.inf)) - 1
    if i < 0 or keyframes[i][0] - now < SEEK_MIN_SKIP:
        return None
    return keyframes[i]


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

"""A table's frames field → cropped uint8 frames (EASYNLP.md §2).

The field is a JSON list with one entry per frame, in time order: base64-encoded images, or with
``enable_img_path=true`` image paths relative to ``img_root_dir``. Every way a row's frames can be
unusable raises FrameError with a reason that names the frame; `row_frames_or_error` turns it
into a RowError carrying the row's line number and idx.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, FrameError, RowError
from ..params import get_bool, get_int
from .preprocess import crop_frame
from .tables import TableRow


@dataclass(frozen=True)
class FrameSource:
    """Where frames come from, and the limits a row's frames are held to before any is decoded.

    enable_img_path: entries are image paths instead of base64 images.
    img_root_dir: the directory relative paths are resolved against. None means the current
        working directory (what a relative path means to any other tool).
    allow_outside_root: paths that leave the root (absolute ones, ``..``, links pointing out)
        are row errors unless this is set: a table from someone else must not make v2t read, and
        name in its reports, any file the process can read.
    max_image_bytes: an image file or base64 frame larger than this is rejected before it is
        read or decoded (a path to /dev/zero or a huge file cannot fill memory); only regular
        files are read at all (no devices, FIFOs or directories).
    max_row_frames: a frames list longer than this is a row error (only the first frame_num
        frames are ever decoded, but a list of thousands is a broken or hostile row).
    max_image_pixels: a frame whose header declares more pixels (width × height) is rejected
        before its pixels are decoded. The default (50 MP) is below PIL's own decompression-bomb
        threshold (~89 MP), so every image PIL would warn about is rejected here first.
    """

    enable_img_path: bool = False
    img_root_dir: str | None = None
    allow_outside_root: bool = False
    max_image_bytes: int = 50_000_000
    max_row_frames: int = 1024
    max_image_pixels: int = 50_000_000

    # The --user_defined_parameters keys `from_user_parameters` reads.
    PARAMETERS = ("enable_img_path", "img_root_dir", "allow_outside_root", "max_image_bytes", "max_row_frames",
                  "max_image_pixels")

    def __post_init__(self) -> None:
        for key in ("max_image_bytes", "max_row_frames", "max_image_pixels"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        if self.enable_img_path and self.img_root_dir is not None and not os.path.isdir(self.img_root_dir):
            raise ConfigError(f"img_root_dir {self.img_root_dir!r} is not a directory")

    @classmethod
    def from_user_parameters(cls, params: Mapping[str, str]) -> "FrameSource":
        """EasyNLP's ``enable_img_path`` and ``img_root_dir``, and v2t's limits, from
        ``--user_defined_parameters`` (defaults where absent)."""
        defaults = cls()
        return cls(enable_img_path=get_bool(params, "enable_img_path", defaults.enable_img_path),
                   img_root_dir=params.get("img_root_dir"),
                   allow_outside_root=get_bool(params, "allow_outside_root", defaults.allow_outside_root),
                   max_image_bytes=get_int(params, "max_image_bytes", defaults.max_image_bytes),
                   max_row_frames=get_int(params, "max_row_frames", defaults.max_row_frames),
                   max_image_pixels=get_int(params, "max_image_pixels", defaults.max_image_pixels))


def parse_frame_list(field: str) -> list[str]:
    """The frames field as a non-empty list of strings."""
    try:
        frames = json.loads(field)
    except (json.JSONDecodeError, RecursionError) as err:
        detail = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
        raise FrameError(f"frames field is not a JSON list of strings ({detail})") from None
    if not isinstance(frames, list):
        raise FrameError(f"frames field is not a JSON list of strings (it is a JSON {type(frames).__name__})")
    for i, item in enumerate(frames, start=1):
        if not isinstance(item, str):
            raise FrameError(f"frames field is not a JSON list of strings (item {i} is a {type(item).__name__})")
    if not frames:
        raise FrameError("frames list is empty")
    return frames


def decode_base64_frame(text: str) -> bytes:
    """Decode one base64 frame as leniently as EasyNLP's ``base64.urlsafe_b64decode`` (standard
    and URL-safe alphabets, even mixed) and a little more (missing ``=`` padding, line breaks,
    a ``data:image/...;base64,`` prefix), but, unlike it, reject characters outside the alphabet
    instead of silently skipping them: a damaged frame should fail here, with a clear reason."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise FrameError("data URI frame is not base64-encoded")
    data = "".join(text.split()).translate(_URLSAFE_TO_STANDARD).rstrip("=")
    if not data:
        raise FrameError("empty base64 frame")
    if len(data) % 4 == 1:  # no padding can complete this: a character was lost
        raise FrameError(f"invalid base64 (length {len(data)} cannot be a whole number of bytes)")
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise FrameError(f"invalid base64 ({err})") from None


_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


def _decode_capped(text: str, source: FrameSource) -> bytes:
    """decode_base64_frame, refusing before decoding a frame that would exceed max_image_bytes."""
    if len(text) * 3 // 4 > source.max_image_bytes:
        raise FrameError(f"base64 frame of about {len(text) * 3 // 4} bytes is over the limit of "
                         f"{source.max_image_bytes} (max_image_bytes)")
    return decode_base64_frame(text)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode an image, checking its declared size before decoding any pixels.

    Decoding happens here (``load()``), so a truncated file fails now as a FrameError rather than
    later inside preprocessing. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is deliberately left off:
    a half-grey frame would be captioned as if it were real.
    """
    # PIL's plugins raise many exception types on hostile bytes (OSError, SyntaxError,
    # struct.error, ValueError, ...); any of them means "this frame is unusable", a row error,
    # so the broad excepts below are on purpose.
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise FrameError("not an image (cannot identify image file)") from None
    except Image.DecompressionBombError as err:
        raise FrameError(f"image too large ({err})") from None
    except Exception as err:  # noqa: BLE001 - see above
        if "truncated" in str(err).lower():  # cut off inside the header
            raise FrameError("truncated image") from None
        raise FrameError(f"unreadable image header ({type(err).__name__}: {err})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise FrameError(f"{width}x{height} pixels exceeds the limit of {max_pixels} pixels "
                         "(max_image_pixels)")
    try:
        image.load()
    except OSError as err:
        if "truncated" in str(err):
            raise FrameError("truncated image") from None
        raise FrameError(f"cannot decode image ({err})") from None
    except Exception as err:  # noqa: BLE001 - see above
        raise FrameError(f"cannot decode image ({type(err).__name__}: {err})") from None
    return image


def load_row_frames(field: str, frame_num: int, img_size: int,
                    source: FrameSource) -> tuple[np.ndarray, int]:
    """Decode and crop the first `frame_num` frames of a frames field.

    Returns uint8 (frame_num, 3, img_size, img_size) and how many frames were padded. Like
    EasyNLP, only the first `frame_num` frames are used (and only they are decoded). A row with
    fewer frames is padded by repeating its last frame, where EasyNLP would stop with an
    assertion; callers count the padded rows and warn, so a whole job is not lost to one short clip.
    """
    if frame_num < 1:
        raise ConfigError(f"frame_num must be at least 1, got {frame_num}")
    crops = []
    entries = parse_frame_list(field)
    if len(entries) > source.max_row_frames:
        raise FrameError(f"{len(entries)} frames listed, over the limit of {source.max_row_frames} (max_row_frames)")
    for i, entry in enumerate(entries[:frame_num], start=1):
        try:
            data = _read_path(entry, source) if source.enable_img_path else _decode_capped(entry, source)
            crops.append(crop_frame(open_image(data, source.max_image_pixels), img_size))
        except FrameError as err:
            raise FrameError(f"frame {i}: {err}") from None
    padded = frame_num - len(crops)
    crops.extend([crops[-1]] * padded)
    return np.stack(crops), padded  # (frame_num, 3, S, S)


def _read_path(entry: str, source: FrameSource) -> bytes:
    if not entry.strip():
        raise FrameError("empty image path")
    if "\0" in entry:  # no file system takes it; os calls would raise ValueError
        raise FrameError(f"image path {entry!r} holds a NUL character")
    root = Path(source.img_root_dir if source.img_root_dir is not None else os.getcwd())
    path = root / entry  # an absolute entry replaces the root
    try:
        real = path.resolve(strict=True)
        if not source.allow_outside_root and not real.is_relative_to(root.resolve()):
            raise FrameError(f"image path {entry!r} leaves img_root_dir (allow_outside_root=true reads it)")
        info = real.stat()
        if not stat.S_ISREG(info.st_mode):
            raise FrameError(f"image path {entry!r} is not a regular file (a directory, device or FIFO)")
        if info.st_size > source.max_image_bytes:
            raise FrameError(f"image file {entry!r} has {info.st_size} bytes, over the limit of "
                             f"{source.max_image_bytes} (max_image_bytes)")
        with open(real, "rb") as f:
            data = f.read(source.max_image_bytes + 1)  # a file that grew since stat is still capped
    except FileNotFoundError:
        raise FrameError(f"image file not found: {entry!r}") from None
    except RuntimeError:  # resolve() on a loop of links, before Python 3.13
        raise FrameError(f"cannot read image file {entry!r} (a loop of symbolic links)") from None
    except OSError as err:
        raise FrameError(f"cannot read image file {entry!r} ({err.strerror or err})") from None
    if len(data) > source.max_image_bytes:
        raise FrameError(f"image file {entry!r} is over the limit of {source.max_image_bytes} bytes (max_image_bytes)")
    return data


def row_frames_or_error(row: TableRow, column: str, frame_num: int, img_size: int,
                        source: FrameSource) -> tuple[np.ndarray, int]:
    """`load_row_frames` on `row`'s `column`, raising RowError (line number, idx, reason) instead
    of FrameError so reports can name the row."""
    try:
        field = row.fields[column]
    except KeyError:
        raise ConfigError(f"frames column {column!r} is not among the row's columns "
                          f"({','.join(row.fields)})") from None
    try:
        return load_row_frames(field, frame_num, img_size, source)
    except FrameError as err:
        raise RowError(row.line_no, row.idx, str(err)) from None

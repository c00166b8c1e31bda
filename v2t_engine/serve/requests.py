"""The JSON body of `POST /v1/captions`, checked field by field before any frame is decoded.

    {"frames": ["<base64 image>", ...], "idx": "v1", "max_generated_num": 1,
     "do_sample": false, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "seed": null,
     "num_beams": 1, "length_penalty": 1.0, "early_stopping": false, "no_repeat_ngram_size": 0,
     "repetition_penalty": 1.0}

(every field but "frames" optional, with SearchOptions' defaults: greedy)
or a batch: ``{"videos": [{"frames": [...], "idx": ...}, ...]}``. Every problem is a BadRequest
whose message names the field (and, in a batch, the video) so the client can fix it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, V2TError
from ..inputs.frames import FrameSource
from ..runtime.search import SearchOptions


class BadRequest(V2TError):
    """The request body is unusable (HTTP 400, or 413 when `too_large`)."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for. The image limits are FrameSource's (the decompression-bomb
    guard reads each image's declared size before decoding its pixels)."""
    max_body_bytes: int = 32 * 1024 * 1024
    max_frames: int = 64  # frames listed in one video (only frame_num are decoded)
    max_videos: int = 64  # videos in one batch request
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 16_000_000
    max_candidates: int = 16  # max_generated_num
    timeout_s: float = 60.0  # from arrival to captions
    retry_after_s: int = 1  # what a 429/503 tells the client to wait

    def __post_init__(self) -> None:
        for key, value in vars(self).items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")

    def frame_source(self) -> FrameSource:
        return FrameSource(max_image_bytes=self.max_image_bytes, max_row_frames=self.max_frames,
                           max_image_pixels=self.max_image_pixels)


@dataclass(frozen=True)
class VideoRequest:
    frames: list[str]
    opts: SearchOptions
    idx: str | int | None = None


FRAMES_FIELD = "frames"  # the API's name for a video's frames (the frame tensor's name too, by chance)
_SEARCH_FIELDS = {"do_sample": bool, "top_k": int, "top_p": float, "temperature": float, "seed": int,
                  "num_beams": int, "length_penalty": float, "early_stopping": bool, "no_repeat_ngram_size": int,
                  "repetition_penalty": float}
_FIELDS = {FRAMES_FIELD, "idx", "max_generated_num", *_SEARCH_FIELDS}


def parse_body(body: bytes, limits: ServeLimits) -> tuple[list[VideoRequest], bool]:
    """The videos a body asks for, and whether it was the batch form."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        detail = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
        raise BadRequest(f"body is not valid JSON ({detail})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"body must be a JSON object, got a JSON {_json_type(data)}")
    if "videos" not in data:
        return [parse_video(data, limits)], False
    if set(data) != {"videos"}:
        raise BadRequest("a batch body holds only \"videos\"")
    videos = data["videos"]
    if not isinstance(videos, list) or not videos:
        raise BadRequest("\"videos\" must be a non-empty list of video objects")
    if len(videos) > limits.max_videos:
        raise BadRequest(f"{len(videos)} videos, over the limit of {limits.max_videos} (max_videos)")
    parsed = []
    for i, video in enumerate(videos):
        try:
            if not isinstance(video, dict):
                raise BadRequest(f"must be a JSON object, got a JSON {_json_type(video)}")
            parsed.append(parse_video(video, limits))
        except BadRequest as err:
            raise BadRequest(f"videos[{i}]: {err}") from None
    return parsed, True


def parse_video(data: dict[str, Any], limits: ServeLimits) -> VideoRequest:
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(_FIELDS))}")
    frames = data.get(FRAMES_FIELD)
    if not isinstance(frames, list) or not frames or not all(isinstance(f, str) for f in frames):
        raise BadRequest(f"\"{FRAMES_FIELD}\" must be a non-empty list of base64 image strings")
    if len(frames) > limits.max_frames:
        raise BadRequest(f"{len(frames)} frames, over the limit of {limits.max_frames} (max_frames)")
    idx = data.get("idx")
    if idx is not None and (isinstance(idx, bool) or not isinstance(idx, (str, int))):
        raise BadRequest("\"idx\" must be a string or an integer")
    return VideoRequest(frames, search_options(data, limits), idx)


def search_options(data: dict[str, Any], limits: ServeLimits) -> SearchOptions:
    values = {}
    for key, kind in (*_SEARCH_FIELDS.items(), ("max_generated_num", int)):
        if data.get(key) is None:
            continue
        value = data[key]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise BadRequest(f"\"{key}\" must be a{'n' if kind is int else ''} {kind.__name__}, got {value!r}")
        values[key] = value
    num_return = values.pop("max_generated_num", 1)
    if not 1 <= num_return <= limits.max_candidates:
        raise BadRequest(f"\"max_generated_num\" must be between 1 and {limits.max_candidates}, got {num_return}")
    try:
        return SearchOptions(num_return=num_return, **values)
    except ConfigError as err:
        raise BadRequest(str(err)) from None


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null", dict: "object"}.get(
        type(value), "number")

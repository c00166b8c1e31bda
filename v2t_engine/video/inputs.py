"""What `--videos` names, as `VideoInput`s: in a fixed order, lazily, each with the idx its row
will carry.

A `--videos` value is one path or several separated by commas (as `--tables`). Each is:

- a directory, walked recursively with each directory's entries sorted by name. Hidden entries
  and text files are passed over; a directory holding images and no videos is one video whose
  frames are its images (sorted by name); images next to videos (covers, thumbnails) are left
  out; every other file is a video, so a broken one is reported rather than silently skipped.
  Links to directories are not followed.
- a list file (a text suffix, or any other UTF-8 text file that is not a known video type): one
  path per line, relative paths taken from the current directory, read as it goes.
- anything else: a video file (a missing path is still an input: reading it fails, and the
  failure is reported).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
# Taken as videos without looking inside (any other file is sniffed: text is a list of paths).
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".wmv", ".flv", ".mpg",
                            ".mpeg", ".ts", ".mts", ".m2ts", ".vob", ".3gp", ".ogv", ".gif", ".y4m"})
# Text files: a --videos file with one of these suffixes is a list of paths, and a directory walk
# passes them over (captions, lists, our own .partial/.errors.tsv/.lock outputs) instead of
# reporting them as broken videos.
TEXT_SUFFIXES = frozenset({".txt", ".lst", ".list", ".tsv", ".csv", ".json", ".jsonl", ".md",
                           ".srt", ".vtt", ".log", ".partial", ".lock", ".yaml", ".yml", ".xml"})
# The longest line of a list file read (a path; file systems allow 4,096 bytes): a longer one
# is an input reported as unusable, skipped in chunks, never held whole.
MAX_LIST_LINE = 1 << 16


@dataclass(frozen=True)
class VideoInput:
    ordinal: int  # 1-based position among all inputs: the "line" of error reports
    idx: str  # always printable as UTF-8 (see `bad_name`)
    path: str
    is_frame_folder: bool = False
    bad_name: str | None = None  # why the name cannot be a table's idx, if it cannot


def iter_inputs(spec: str, idx_style: str = "path") -> Iterator[VideoInput]:
    """Every input named by `spec` (see the module's docstring), lazily, in a deterministic order.

    idx is the path relative to the walked directory, or the path as written in the list or on
    the command line; with ``idx_style="stem"`` it is the name without extension (a frame
    folder's name)."""
    if idx_style not in ("path", "stem"):
        raise ConfigError(f"idx style must be path or stem, got {idx_style!r}")
    return _inputs(_parts(spec), idx_style)


def _inputs(parts: list[str], idx_style: str) -> Iterator[VideoInput]:
    ordinal = 0
    for part in parts:
        for idx, path, is_folder, problem in _expand(part):
            ordinal += 1
            if idx_style == "stem" and not problem:
                idx = Path(idx).name if is_folder else Path(idx).stem
            yield VideoInput(ordinal, printable(idx), path, is_folder, problem or _name_problem(idx))


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


def _exists(path: Path, test=Path.exists) -> bool:
    """`test(path)` (exists, is_dir, is_file), False for a name no file system takes (too long,
    a NUL byte, a loop of links) instead of an OSError or ValueError."""
    try:
        return test(path)
    except (OSError, ValueError):
        return False


def _parts(spec: str) -> list[str]:
    if _exists(Path(spec.strip())):
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
            if _exists(path, Path.is_dir):
                total += sum(1 for _ in _walk(path, path))
            elif _exists(path, Path.is_file) and _is_list_file(path):
                with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
                    total += sum(1 for line in _lines(f) if line is None or line.strip())
            else:
                total += 1
    except OSError:
        return None
    return total


def _expand(part: str) -> Iterator[tuple[str, str, bool, str | None]]:
    """(idx, path, is_frame_folder, why it cannot be read or None) for one `--videos` path."""
    path = Path(part)
    if _exists(path, Path.is_dir):
        yield from _walk(path, path)
    elif _exists(path, Path.is_file) and _is_list_file(path):
        yield from _list_entries(path)
    else:
        yield part, part, False, None  # a video, or a missing path reported when it is read


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


def _list_entries(list_path: Path) -> Iterator[tuple[str, str, bool, str | None]]:
    # surrogateescape: a listed name that is not UTF-8 still reaches the file system as its
    # bytes, and is reported (bad_name) instead of ending the job.
    with open(list_path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for line_no, line in enumerate(_lines(f), start=1):  # streamed, one bounded line at a time
            if line is None:
                yield (f"{list_path.name} line {line_no}", str(list_path), False,
                       f"listed path is longer than {MAX_LIST_LINE} characters; skipped unread")
                continue
            entry = line.strip()
            if "\0" in entry:
                yield entry.replace("\0", " "), entry, False, "the listed path holds a NUL character"
            elif entry:
                yield entry, entry, _exists(Path(entry), Path.is_dir), None


def _lines(f) -> Iterator[str | None]:
    """The lines of a text file, None for one longer than MAX_LIST_LINE (read past in chunks)."""
    while line := f.readline(MAX_LIST_LINE + 1):
        if len(line) <= MAX_LIST_LINE or line.endswith("\n"):
            yield line
            continue
        while (chunk := f.readline(1 << 20)) and not chunk.endswith("\n"):
            pass
        yield None


def _walk(root: Path, top: Path) -> Iterator[tuple[str, str, bool, str | None]]:
    """Depth-first, each directory's entries sorted by name; only one directory's listing is
    held at a time. A directory that cannot be listed is an input reported with the reason."""
    rel = top.relative_to(root).as_posix()
    name = root.name if rel == "." else rel
    try:
        with os.scandir(top) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        kinds = {e.name: _kind(e) for e in entries}
    except OSError as err:
        yield name, str(top), False, f"cannot list the directory ({err.strerror or err})"
        return
    if "image" in kinds.values() and "video" not in kinds.values():
        yield name, str(top), True, None
    for entry in entries:
        if kinds[entry.name] == "dir":
            yield from _walk(root, Path(entry.path))
        elif kinds[entry.name] == "video":
            yield Path(entry.path).relative_to(root).as_posix(), entry.path, False, None
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

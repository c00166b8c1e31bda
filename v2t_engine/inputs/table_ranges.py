"""Rows of a list of tables from a position to a position: what `--resume` and `--shard` read.

A job's input is its tables read one after the other. A `TablePosition` names where a line
starts in that sequence (table, byte offset, line number), so a resumed job seeks to where it
stopped instead of re-reading hours of input, and a shard reads only its part.

Shards split the tables' bytes, not their rows: shard I of N owns the lines that start in bytes
[I·S/N, (I+1)·S/N) of the S bytes of all tables, as Hadoop's input splits do. Every shard finds
its bounds from file sizes alone, with no coordination and without reading the other shards'
rows; the bounds of neighbouring shards are the same positions, so every line belongs to exactly
one shard, and the shards' outputs laid end to end are the single run's output.

Every line also has a global number (`key`: its 0-based index among all the tables' lines), the
same whichever shard or resumed run reads it: sampling draws from streams keyed by it, so seeded
captions do not depend on how the job was split or restarted.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

from ..errors import ConfigError, RowError, TableError
from .tables import InputSchema, TableRow, count_lines, read_lines


@dataclass(frozen=True)
class TablePosition:
    """The start of a line: table index, byte offset in it, that line's 1-based number in its
    table, and the lines of the tables before it. Past the last table: table == len(tables)."""

    table: int = 0
    offset: int = 0
    line_no: int = 1
    lines_before: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TablePosition":
        return cls(**{k: int(data[k]) for k in ("table", "offset", "line_no", "lines_before")})

    def reached(self, stop: "TablePosition | None") -> bool:
        return stop is not None and (self.table, self.offset) >= (stop.table, stop.offset)


class PlacedRow(NamedTuple):
    item: TableRow | RowError
    key: int  # the line's 0-based number among all the tables' lines
    next: TablePosition  # where the row after it would start


def read_tables(paths: Sequence[str], schema: InputSchema, max_row_bytes: int,
                start: TablePosition | None = None, stop: TablePosition | None = None) -> Iterator[PlacedRow]:
    """The rows whose lines start at or after `start` and before `stop` (None: the end)."""
    pos = start or TablePosition()
    while pos.table < len(paths) and not pos.reached(stop):
        path = paths[pos.table]
        stop_offset = stop.offset if stop is not None and stop.table == pos.table else None
        line_no = pos.line_no - 1  # the last line read
        for item, _, end in read_lines(path, schema, max_row_bytes, pos.offset, pos.line_no, stop_offset):
            line_no += 1
            if item is not None:
                yield PlacedRow(item, pos.lines_before + line_no - 1,
                                TablePosition(pos.table, end, line_no + 1, pos.lines_before))
        if stop_offset is not None:
            return  # the stop lies inside this table: the lines from it on are the next shard's
        pos = TablePosition(pos.table + 1, 0, 1, pos.lines_before + line_no)


def shard_bounds(paths: Sequence[str], index: int, count: int) -> tuple[TablePosition, TablePosition]:
    """(start, stop) of shard `index` of `count`: the lines starting in its byte range."""
    if not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count}: the index must be in 0..{count - 1}")
    sizes = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as err:
            raise TableError(f"table {path!r}: {err.strerror or err}") from None
        if not os.path.isfile(path):
            raise ConfigError(f"--shard needs regular files (it splits them by size); {path!r} is not one")
        sizes.append(st.st_size)
    total = sum(sizes)
    return (_line_start(paths, sizes, index * total // count),
            _line_start(paths, sizes, (index + 1) * total // count))


def _line_start(paths: Sequence[str], sizes: list[int], byte: int) -> TablePosition:
    """The position of the first line that starts at or after global byte `byte`."""
    lines_before = 0
    for table, (path, size) in enumerate(zip(paths, sizes)):
        offset = _next_line(path, byte) if byte < size else size
        if offset < size:
            return TablePosition(table, offset, _newlines(path, offset) + 1, lines_before)
        # No line starts in this table from there on: the first line of the next table does.
        byte = max(0, byte - size)
        lines_before += count_lines(path)
    return TablePosition(len(paths), 0, 1, lines_before)


def _next_line(path: str, offset: int) -> int:
    """`offset` when a line starts there, else the offset after the line it falls in."""
    if offset == 0:
        return 0
    with open(path, "rb") as f:
        f.seek(offset - 1)
        if f.read(1) == b"\n":
            return offset
        while chunk := f.readline(1 << 20):
            if chunk.endswith(b"\n"):
                break
        return f.tell()


def _newlines(path: str, end: int) -> int:
    """Line ends in the first `end` bytes of a file, read in 1 MiB chunks."""
    n = 0
    with open(path, "rb") as f:
        while end > 0 and (chunk := f.read(min(1 << 20, end))):
            n += chunk.count(b"\n")
            end -= len(chunk)
    return n


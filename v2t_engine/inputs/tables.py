"""Streaming reader for EasyNLP tables (EASYNLP.md §1-2).

A table is UTF-8 text, one row per line, fields separated by tabs, no header. Columns are
matched by position against ``--input_schema`` (``name:type:count,...``). Tables can be many
gigabytes of base64 frames, so rows are read one at a time and never all held in memory.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, RowError, TableError

# EasyNLP's column names: the row id, and the defaults of --first_sequence and --second_sequence.
IDX_COLUMN = "idx"
FRAMES_COLUMN = "imgbase64"
TEXT_COLUMN = "text"
# The longest table line read (a row of base64 frames); longer lines are row errors.
DEFAULT_MAX_ROW_BYTES = 1 << 30
# The types EasyNLP's schemas use. v2t keeps every field as text; the type is only validated.
_SCHEMA_TYPES = ("str", "int", "float")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    # EasyNLP's count (values packed in one field). Kept as written: every column is still
    # exactly one tab-separated field, which is all the frames/text/idx columns ever need.
    count: int


@dataclass(frozen=True)
class InputSchema:
    columns: tuple[Column, ...]

    def __post_init__(self) -> None:
        if not self.columns:
            raise ConfigError("input schema has no columns")
        seen: set[str] = set()
        for col in self.columns:
            if col.name in seen:
                raise ConfigError(f"input schema names column {col.name!r} twice ({self})")
            seen.add(col.name)

    @classmethod
    def parse(cls, text: str) -> InputSchema:
        """Parse EasyNLP's ``--input_schema``, e.g. ``idx:str:1,imgbase64:str:1,text:str:1``."""
        columns = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue  # tolerate a trailing comma, as the --tables list does
            pieces = [p.strip() for p in part.split(":")]
            if len(pieces) != 3 or not pieces[0]:
                raise ConfigError(f"input schema entry {part!r} is not name:type:count (in {text!r})")
            name, typ, count = pieces
            if typ not in _SCHEMA_TYPES:
                raise ConfigError(f"input schema column {name!r} has type {typ!r}; "
                                  f"expected one of {', '.join(_SCHEMA_TYPES)}")
            if not count.isdigit() or int(count) < 1:
                raise ConfigError(f"input schema column {name!r} has count {count!r}; "
                                  "expected a positive integer")
            columns.append(Column(name, typ, int(count)))
        if not columns:
            raise ConfigError(f"input schema {text!r} has no columns")
        return cls(tuple(columns))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def position(self, name: str) -> int:
        """0-based field index of column `name`; ConfigError naming the schema if it is absent."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ConfigError(f"column {name!r} is not in the input schema "
                              f"({','.join(self.names)})") from None

    def __str__(self) -> str:
        return ",".join(f"{c.name}:{c.type}:{c.count}" for c in self.columns)


@dataclass(frozen=True)
class TableRow:
    line_no: int  # 1-based physical line number in its table, for error reports
    fields: dict[str, str]

    @property
    def idx(self) -> str | None:
        return self.fields.get(IDX_COLUMN)


def iter_tables(spec: str) -> list[str]:
    """Split EasyNLP's comma-separated ``--tables`` value into paths (spaces stripped, empties
    dropped: ``"a.txt, b.txt,"`` → ``["a.txt", "b.txt"]``)."""
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    if not paths:
        raise ConfigError(f"--tables {spec!r} names no table")
    return paths


def read_table(path: str | os.PathLike, schema: InputSchema,
               max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[TableRow | RowError]:
    """Yield the rows of one table in order, lazily.

    A row that cannot be split into the schema's columns is yielded as a RowError (not raised),
    so callers can report it and go on. Blank lines are skipped; a UTF-8 BOM and CRLF line ends
    are tolerated; fields beyond the schema are ignored (EasyNLP ignores them too). A line longer
    than `max_row_bytes` is a RowError too, and is skipped in chunks, never held in memory (a
    table that is one endless line, like /dev/zero, cannot exhaust it).

    The missing-file check runs now, not at the first ``next()``, so a typo in the last of
    several tables fails before the first one has been processed. Pipes are fine
    (``--tables <(zcat big.txt.gz)``): the table is read front to back exactly once.
    """
    path = Path(path)
    if not path.exists():
        raise TableError(f"table {str(path)!r} does not exist")
    if path.is_dir():
        raise TableError(f"table {str(path)!r} is a directory, not a file")
    if max_row_bytes < 1:
        raise ConfigError(f"max_row_bytes must be positive, got {max_row_bytes}")
    return _rows(path, schema, max_row_bytes)


def _rows(path: Path, schema: InputSchema, max_row_bytes: int) -> Iterator[TableRow | RowError]:
    for row, _, _ in read_lines(path, schema, max_row_bytes):
        if row is not None:
            yield row


def read_lines(path: str | os.PathLike, schema: InputSchema, max_row_bytes: int, offset: int = 0,
               line_no: int = 1, stop: int | None = None) -> Iterator[tuple[TableRow | RowError | None, int, int]]:
    """(row, its line's start offset, the offset after it) for each line of one table that
    starts at or after byte `offset` (where line `line_no` starts) and before byte `stop`; the
    row is None for a blank line. The reader behind `read_table`; resume and shards
    (table_ranges.py) start and stop it mid-table."""
    try:
        # Binary mode and per-line decoding: one row with invalid UTF-8 becomes that row's
        # error instead of a UnicodeDecodeError that ends the whole job. Splitting on b"\n"
        # only (not universal newlines) keeps line numbers equal to what `wc -l`/editors show.
        with open(path, "rb") as f:
            if offset:
                f.seek(offset)
            line_no -= 1
            start = offset
            while (stop is None or start < stop) and (raw := f.readline(max_row_bytes + 1)):
                line_no += 1
                if len(raw) > max_row_bytes and not raw.endswith(b"\n"):
                    error = _too_long(raw, line_no, schema, max_row_bytes)
                    _skip_line(f)
                    end = f.tell()
                    yield error, start, end
                    start = end
                    continue
                end = start + len(raw)
                yield parse_line(raw, line_no, schema), start, end
                start = end
    except OSError as err:
        raise TableError(f"cannot read table {str(path)!r}: {err}") from err


def _too_long(head: bytes, line_no: int, schema: InputSchema, max_row_bytes: int) -> RowError:
    names = schema.names
    fields = head[:4096].decode("utf-8", "replace").split("\t")[:-1]  # only fields that end in view
    idx = _field(fields, names.index(IDX_COLUMN) if IDX_COLUMN in names else None)
    return RowError(line_no, idx, f"row longer than {max_row_bytes} bytes (max_row_bytes); skipped unread")


def _skip_line(f) -> None:
    """Read past the rest of the current line, a chunk at a time."""
    while chunk := f.readline(1 << 20):
        if chunk.endswith(b"\n"):
            return


def parse_line(raw: bytes, line_no: int, schema: InputSchema) -> TableRow | RowError | None:
    """One physical line (bytes, line end included or not) → a row, a RowError, or None for a
    blank line. Public so a reader that seeks to a remembered offset (lazy training data)
    parses a line exactly as `read_table` did."""
    if line_no == 1:
        raw = raw.removeprefix(_BOM)
    raw = raw.rstrip(b"\n").removesuffix(b"\r")
    names = schema.names
    idx_pos = names.index(IDX_COLUMN) if IDX_COLUMN in names else None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        # The idx is usually plain ASCII even when another field is damaged.
        idx = _field(raw.decode("utf-8", "replace").split("\t"), idx_pos)
        return RowError(line_no, idx, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})")
    if not text.strip() and "\t" not in text:
        return None  # blank line; a line of tabs is a row of empty fields, kept to be reported
    fields = text.split("\t")
    if len(fields) < len(names):
        return RowError(line_no, _field(fields, idx_pos),
                        f"expected {len(names)} tab-separated columns ({','.join(names)}), found {len(fields)}")
    return TableRow(line_no, dict(zip(names, fields)))


def _field(fields: list[str], pos: int | None) -> str | None:
    return fields[pos] if pos is not None and pos < len(fields) else None


def count_lines(path: str | os.PathLike) -> int:
    """Physical lines of a file, an upper bound on its rows (a last line without a line end
    counts), in 1 MiB binary chunks: far faster than parsing, for progress totals and memory
    estimates."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")

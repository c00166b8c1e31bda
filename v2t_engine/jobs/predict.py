"""`v2t predict` over tables: stream rows, decode frames in a thread pool ahead of the model,
caption with continuous batching, write ``idx \\t gen_text`` rows in input order, and report bad
rows without stopping."""
from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.captioner import Captioner
from ..errors import ConfigError, RowError
from ..inputs.frames import FrameSource, row_frames_or_error
from ..inputs.preprocess import normalize
from ..runtime.search import SearchOptions
from ..inputs.tables import InputSchema, TableRow, read_table
from ..inputs.writer import AtomicTableWriter, ErrorReport

log = logging.getLogger(__name__)

GEN_TEXT = "gen_text"
# Exit status of `v2t predict` when the job finished but some rows were left out.
EXIT_SOME_ROWS_FAILED = 3


@dataclass(frozen=True)
class PredictOptions:
    tables: tuple[str, ...]
    outputs: str
    input_schema: InputSchema
    first_sequence: str = "imgbase64"
    output_schema: tuple[str, ...] = ("idx", GEN_TEXT)
    append_cols: tuple[str, ...] = ()
    micro_batch_size: int = 8
    frame_num: int | None = None  # None: the model's
    text_len: int | None = None  # None: the model's
    search: SearchOptions = field(default_factory=SearchOptions)
    on_error: str = "skip"  # skip: report and go on; fail: stop at the first bad row
    frame_source: FrameSource = field(default_factory=FrameSource)
    workers: int = 2

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "fail"):
            raise ConfigError(f"on_error must be skip or fail, got {self.on_error!r}")
        names = set(self.input_schema.names)
        self.input_schema.position(self.first_sequence)  # raises naming the column
        for col in (*self.output_schema, *self.append_cols):
            if col != GEN_TEXT and col not in names:
                raise ConfigError(f"output column {col!r} is neither {GEN_TEXT} nor an input column "
                                  f"({', '.join(self.input_schema.names)})")


@dataclass
class PredictReport:
    rows_ok: int = 0
    rows_failed: int = 0
    rows_padded: int = 0
    outputs: str = ""
    errors_path: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_ROWS_FAILED if self.rows_failed else 0


@dataclass
class _Decoded:
    row: TableRow
    pixels: np.ndarray | None = None  # uint8 (F, 3, S, S)
    padded: int = 0
    error: RowError | None = None


def _rows(opts: PredictOptions) -> Iterator[TableRow | RowError]:
    for table in opts.tables:
        yield from read_table(table, opts.input_schema)


def _decode_ahead(pool: Executor, decode: Callable, items: Iterable, window: int) -> Iterator:
    """decode(item) for every item, in input order, computed in `pool` while the consumer works
    on earlier ones; at most `window` in flight, so memory stays flat however long the input."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(decode, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _InOrder:
    """Captions finish out of input order (continuous batching); rows are written in it. A row
    waits here until every row before it is written or reported bad; how many wait is bounded by
    how many short captions can pass one long one, and they hold only their output columns."""

    def __init__(self, write: Callable[[TableRow, list[str]], None], progress):
        self._write, self._progress = write, progress
        self._waiting: dict[int, list] = {}  # number in the input → [row, captions or None]
        self._next = 0

    def expect(self, seq: int, row: TableRow) -> None:
        self._waiting[seq] = [row, None]

    def skip(self, seq: int) -> None:
        self._waiting[seq] = None
        self._flush()

    def done(self, seq: int, captions: list[str]) -> None:
        self._waiting[seq][1] = captions
        self._flush()

    def _flush(self) -> None:
        while self._next in self._waiting:
            entry = self._waiting[self._next]
            if entry is not None and entry[1] is None:
                return  # its caption is not finished yet
            del self._waiting[self._next]
            if entry is not None:
                self._write(*entry)
            if self._progress is not None:
                self._progress(1)
            self._next += 1


def predict_tables(captioner: Captioner, opts: PredictOptions, progress=None,
                   rows: Iterable[TableRow | RowError] | None = None) -> PredictReport:
    """Run the whole job. Raises RowError at the first bad row when on_error == "fail" (leaving no
    output); otherwise every bad row goes to the error report and the job goes on. `rows`, when
    given, replaces reading `opts.tables` (`v2t predict --videos` passes the rows it makes)."""
    cfg = captioner.config
    frame_num = opts.frame_num or cfg.frame_num
    if frame_num != cfg.frame_num:
        log.warning("frame_num=%d differs from the %d frames the model was trained on", frame_num, cfg.frame_num)
    text_len = captioner.max_new_tokens(opts.text_len)
    report = PredictReport(outputs=opts.outputs)
    errors = ErrorReport(opts.outputs)

    def decode(item: TableRow | RowError) -> _Decoded:
        if isinstance(item, RowError):
            return _Decoded(row=TableRow(item.line_no, {}), error=item)
        try:
            pixels, padded = row_frames_or_error(item, opts.first_sequence, frame_num, cfg.img_size,
                                                 opts.frame_source)
            return _Decoded(item, pixels, padded)
        except RowError as err:
            return _Decoded(item, error=err)

    with AtomicTableWriter(opts.outputs) as writer, ThreadPoolExecutor(max(1, opts.workers)) as pool:
        def write(row: TableRow, captions: list[str]) -> None:
            writer.write_row(_output_fields(row, captions, opts))
            report.rows_ok += 1

        in_order = _InOrder(write, progress)

        def videos() -> Iterator[tuple[int, np.ndarray]]:
            # Enough rows decoded ahead for a whole refill of the slots, so the model does not
            # wait on JPEG decoding.
            window = opts.micro_batch_size + 2 * opts.workers
            source = _rows(opts) if rows is None else rows
            for seq, d in enumerate(_decode_ahead(pool, decode, source, window)):
                if d.error is None:
                    report.rows_padded += d.padded > 0
                    in_order.expect(seq, _output_columns(d.row, opts))
                    yield seq, normalize(d.pixels)
                elif opts.on_error == "fail":
                    raise d.error
                else:
                    log.error("skipping %s", d.error)
                    errors.add(d.error.line_no, d.error.idx, d.error.reason)
                    report.rows_failed += 1
                    in_order.skip(seq)

        try:
            for seq, captions in captioner.caption_stream(videos(), opts.search, text_len,
                                                          slots=opts.micro_batch_size):
                in_order.done(seq, captions)
                writer.flush()
        except RowError:
            writer.discard()
            errors.close()
            raise
        errors.close()
        writer.commit()
    report.errors_path = str(errors.path) if report.rows_failed else None
    if report.rows_padded:
        log.warning("%d rows had fewer than frame_num=%d frames and were padded by repeating their "
                    "last frame", report.rows_padded, frame_num)
    return report


def _output_columns(row: TableRow, opts: PredictOptions) -> TableRow:
    """The row without the columns the output does not use (the frames): what waits in _InOrder."""
    keep = set(opts.output_schema) | set(opts.append_cols)
    return TableRow(row.line_no, {k: v for k, v in row.fields.items() if k in keep})


def _output_fields(row: TableRow, candidates: list[str], opts: PredictOptions) -> list[str]:
    # JSON array: json.loads reads it, and so does the ast.literal_eval EasyNLP users apply.
    gen_text = json.dumps(candidates, ensure_ascii=False)
    return [gen_text if col == GEN_TEXT else row.fields[col]
            for col in (*opts.output_schema, *opts.append_cols)]


def parse_columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def count_rows(tables: tuple[str, ...]) -> int | None:
    """Lines in the tables, for the progress bar's total (a fast byte scan; None if unreadable)."""
    try:
        total = 0
        for table in tables:
            with open(Path(table), "rb") as f:
                total += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        return total
    except OSError:
        return None

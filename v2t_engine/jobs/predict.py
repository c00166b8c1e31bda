"""`v2t predict` over tables or videos: stream rows, decode frames in a thread pool ahead of the
model, caption with continuous batching, write ``idx \\t gen_text`` rows in input order, and
report bad rows without stopping. gen_text is a JSON array of the captions, or (output_format
"easynlp") exactly what EasyNLP's predictor writes."""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..config import ModelConfig
from ..concurrency import map_ahead
from ..errors import ConfigError, RowError, V2TError
from ..inputs.frames import FrameSource, row_frames_or_error
from ..inputs.preprocess import normalize
from ..inputs.tables import (DEFAULT_MAX_ROW_BYTES, FRAMES_COLUMN, IDX_COLUMN, InputSchema, TableRow,
                             count_lines, read_table)
from ..inputs.writer import TableOutput, TableReport
from ..params import get_int
from ..runtime.captioner import Captioner
from ..runtime.search import SearchOptions

log = logging.getLogger(__name__)

GEN_TEXT = "gen_text"
# json: a JSON array, v2t's caption text; easynlp: EasyNLP's str() of the list, EasyNLP's text.
OUTPUT_FORMATS = ("json", "easynlp")
# The --user_defined_parameters keys predict reads (EasyNLP's names).
PREDICT_PARAMS = ("frame_num", "max_generated_num", "text_len", "img_size", "img_len", "max_row_bytes",
                  *FrameSource.PARAMETERS)


@dataclass(frozen=True)
class PredictOptions:
    tables: tuple[str, ...]
    outputs: str
    input_schema: InputSchema
    first_sequence: str = FRAMES_COLUMN
    output_schema: tuple[str, ...] = (IDX_COLUMN, GEN_TEXT)
    append_cols: tuple[str, ...] = ()
    micro_batch_size: int = 8
    frame_num: int | None = None  # None: the model's
    text_len: int | None = None  # None: the model's
    # EasyNLP's image geometry, when given: it must be the model's (checked when the job starts).
    img_size: int | None = None
    img_len: int | None = None
    search: SearchOptions = field(default_factory=SearchOptions)
    on_error: str = "skip"  # skip: report and go on; fail: stop at the first bad row
    frame_source: FrameSource = field(default_factory=FrameSource)
    workers: int = 2
    output_format: str = "json"  # one of OUTPUT_FORMATS
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES  # longer table lines are row errors, never read whole

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "fail"):
            raise ConfigError(f"on_error must be skip or fail, got {self.on_error!r}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ConfigError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, "
                              f"got {self.output_format!r}")
        if self.micro_batch_size < 1 or self.workers < 1:
            raise ConfigError("micro_batch_size and workers must be at least 1")
        names = set(self.input_schema.names)
        self.input_schema.position(self.first_sequence)  # raises naming the column
        for col in (*self.output_schema, *self.append_cols):
            if col != GEN_TEXT and col not in names:
                raise ConfigError(f"output column {col!r} is neither {GEN_TEXT} nor an input column "
                                  f"({', '.join(self.input_schema.names)})")

    @classmethod
    def from_user_parameters(cls, params: Mapping[str, str], search: SearchOptions = SearchOptions(),
                             **fields) -> "PredictOptions":
        """Options with EasyNLP's ``--user_defined_parameters`` (PREDICT_PARAMS) applied:
        frame_num, text_len, img_size, img_len, max_generated_num (the search's num_return),
        enable_img_path and img_root_dir (the frame source)."""
        unknown = sorted(set(params) - set(PREDICT_PARAMS))
        if unknown:
            raise ConfigError(f"user_defined_parameters: unknown key(s) {', '.join(unknown)}; "
                              f"known keys: {', '.join(PREDICT_PARAMS)}")
        ints = {k: get_int(params, k) for k in ("frame_num", "text_len", "img_size", "img_len")}
        ints["max_row_bytes"] = get_int(params, "max_row_bytes", DEFAULT_MAX_ROW_BYTES)
        search = dataclasses.replace(search, num_return=get_int(params, "max_generated_num", search.num_return))
        source = FrameSource.from_user_parameters(params)
        return cls(**ints, search=search, frame_source=source, **fields)

    def check_model(self, cfg: ModelConfig) -> None:
        """ConfigError when the options contradict the model they will run."""
        for key, want in (("img_size", cfg.img_size), ("img_len", cfg.img_len)):
            given = getattr(self, key)
            if given is not None and given != want:
                raise ConfigError(f"user_defined_parameters: {key}={given} but the model was built "
                                  f"with {key}={want}")
        if self.frame_num is not None and self.frame_num != cfg.frame_num:
            log.warning("frame_num=%d differs from the %d frames the model was trained on",
                        self.frame_num, cfg.frame_num)


@dataclass
class PredictReport(TableReport):
    rows_padded: int = 0

    def summary(self) -> str:
        return f"captioned {self.written} rows into {self.outputs}"


class StoppedAtBadRow(V2TError):
    """--on_error fail met a bad row: the job stopped and wrote nothing."""


@dataclass
class _Decoded:
    row: TableRow
    pixels: np.ndarray | None = None  # uint8 (F, 3, S, S)
    padded: int = 0
    error: RowError | None = None


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
    """Run the whole job. With on_error == "fail" the first bad row stops it (StoppedAtBadRow,
    no output left); otherwise every bad row goes to the error report and the job goes on.
    `rows`, when given, replaces reading `opts.tables` (`predict_videos` passes the rows it makes)."""
    cfg = captioner.config
    opts.check_model(cfg)
    captioner.max_new_tokens(opts.text_len)  # a text_len the model cannot take fails before any work
    if opts.output_format == "easynlp":
        # EasyNLP's caption text as well as its list syntax: files then compare byte for byte.
        captioner = Captioner(captioner.backend, captioner.tokenizer.with_decode_style("easynlp"))
    report = PredictReport(outputs=opts.outputs)
    source = _table_rows(opts) if rows is None else rows
    with TableOutput(report) as out, ThreadPoolExecutor(opts.workers) as pool:
        in_order = _InOrder(lambda row, captions: out.write_row(_output_fields(row, captions, opts)), progress)
        # Enough rows decoded ahead for a whole refill of the slots, so the model does not wait
        # on JPEG decoding.
        decoded = map_ahead(pool, _decoder(opts, cfg), source, opts.micro_batch_size + 2 * opts.workers)
        videos = _videos(decoded, opts, in_order, out, report)
        try:
            for seq, captions in captioner.caption_stream(videos, opts.search, opts.text_len,
                                                          slots=opts.micro_batch_size):
                in_order.done(seq, captions)
                out.flush()
        except RowError as err:
            out.discard()
            where = ", ".join(opts.tables) or "the videos"
            raise StoppedAtBadRow(f"bad row in {where}, {err}; no output written "
                                  "(use --on_error skip to leave bad rows out)") from None
        out.commit()
    if report.rows_padded:
        log.warning("%d rows had fewer than frame_num=%d frames and were padded by repeating their "
                    "last frame", report.rows_padded, opts.frame_num or cfg.frame_num)
    return report


def _table_rows(opts: PredictOptions) -> Iterator[TableRow | RowError]:
    for table in opts.tables:
        yield from read_table(table, opts.input_schema, opts.max_row_bytes)


def _decoder(opts: PredictOptions, cfg: ModelConfig) -> Callable[[TableRow | RowError], _Decoded]:
    frame_num = opts.frame_num or cfg.frame_num

    def decode(item: TableRow | RowError) -> _Decoded:
        if isinstance(item, RowError):
            return _Decoded(row=TableRow(item.line_no, {}), error=item)
        try:
            pixels, padded = row_frames_or_error(item, opts.first_sequence, frame_num, cfg.img_size,
                                                 opts.frame_source)
            return _Decoded(item, pixels, padded)
        except RowError as err:
            return _Decoded(item, error=err)
    return decode


def _videos(decoded: Iterator[_Decoded], opts: PredictOptions, in_order: _InOrder, out: TableOutput,
            report: PredictReport) -> Iterator[tuple[int, np.ndarray]]:
    """(input number, normalized pixels) of the good rows; bad rows go to the error report (or,
    with on_error fail, stop the job)."""
    for seq, d in enumerate(decoded):
        if d.error is None:
            report.rows_padded += d.padded > 0
            in_order.expect(seq, _output_columns(d.row, opts))
            yield seq, normalize(d.pixels)
        elif opts.on_error == "fail":
            raise d.error
        else:
            log.error("skipping %s", d.error)
            out.add_error(d.error.line_no, d.error.idx, d.error.reason)
            in_order.skip(seq)


def predict_videos(captioner: Captioner, videos: str, opts: PredictOptions, frame_opts,
                   idx_style: str = "path", progress=None) -> PredictReport:
    """Caption what `videos` names (directories, lists, files: video/inputs.py) without writing a
    table: each video becomes the row `v2t make-table` would write with `frame_opts` (its frame
    count defaults to the model's frame_num), so the captions are those of make-table + predict."""
    from ..video.decode import require_av
    from ..video.rows import VideoRows

    require_av()
    if frame_opts.frames is None:
        frame_opts = dataclasses.replace(frame_opts, frames=opts.frame_num or captioner.config.frame_num)
    # The rows hold idx and base64 frames, never paths, whatever the table options said.
    opts = dataclasses.replace(opts, tables=(), frame_source=FrameSource(),
                               input_schema=InputSchema.parse(f"{IDX_COLUMN}:str:1,{opts.first_sequence}:str:1"))
    rows = VideoRows(videos, frame_opts, column=opts.first_sequence, workers=opts.workers, idx_style=idx_style)
    return predict_tables(captioner, opts, progress=progress, rows=rows)


def _output_columns(row: TableRow, opts: PredictOptions) -> TableRow:
    """The row without the columns the output does not use (the frames): what waits in _InOrder."""
    keep = set(opts.output_schema) | set(opts.append_cols)
    return TableRow(row.line_no, {k: v for k, v in row.fields.items() if k in keep})


def _output_fields(row: TableRow, candidates: list[str], opts: PredictOptions) -> list[str]:
    gen_text = format_gen_text(candidates, opts.output_format)
    return [gen_text if col == GEN_TEXT else row.fields[col]
            for col in (*opts.output_schema, *opts.append_cols)]


def format_gen_text(candidates: list[str], output_format: str) -> str:
    """The gen_text field of one row."""
    if output_format == "easynlp":
        # What EasyNLP's SimplePredictorManager writes (`str(output_dict["gen_text"])`): Python's
        # list repr, single quotes unless a caption holds one, CJK as is.
        return str([str(c) for c in candidates])  # plain str: numpy 2 would write np.str_('…')
    # JSON array: json.loads reads it, and so does the ast.literal_eval EasyNLP users apply.
    return json.dumps(candidates, ensure_ascii=False)


def count_rows(tables: Iterable[str]) -> int | None:
    """Lines in the tables, for the progress bar's total (None if one is unreadable)."""
    try:
        return sum(count_lines(t) for t in tables)
    except OSError:
        return None

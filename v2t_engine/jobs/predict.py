"""`v2t predict` over tables or videos: stream rows, decode frames ahead of the model (in worker
processes, or threads), caption with continuous batching, write ``idx \\t gen_text`` rows in
input order, and report bad rows without stopping. gen_text is a JSON array of the captions, or
(output_format "easynlp") exactly what EasyNLP's predictor writes."""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, RowError, V2TError
from ..inputs.frames import FrameSource
from ..inputs.table_ranges import PlacedRow, TablePosition, read_tables, shard_bounds
from ..inputs.tables import DEFAULT_MAX_ROW_BYTES, FRAMES_COLUMN, IDX_COLUMN, InputSchema, TableRow, count_lines
from ..inputs.writer import TableOutput, TableReport
from ..params import get_int
from ..runtime.captioner import Captioner
from ..runtime.search import SearchOptions
from .decoding import Decoded, DecodePool, FrameDecoder, decode_processes, decoded_rows, rows_per_task
from .journal import JobRecord, Progress, job_identity, record_path

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    workers: int = 2  # threads decoding frames, when decode_processes is 0
    # Processes decoding frames: 0 decodes in `workers` threads; None: see decoding.decode_processes().
    decode_processes: int | None = None
    output_format: str = "json"  # one of OUTPUT_FORMATS
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES  # longer table lines are row errors, never read whole
    shard: tuple[int, int] | None = None  # (I, N): the I-th of N parts of the tables (table_ranges.py)
    sync_interval: float = 10.0  # seconds between fsyncs of the outputs and saves of the job record
    # The backend's compute precision: set by predict_tables from the backend it runs, so the job
    # record holds it and --resume refuses to go on at another one (bf16 captions differ from fp32).
    precision: str | None = None

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "fail"):
            raise ConfigError(f"on_error must be skip or fail, got {self.on_error!r}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ConfigError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, "
                              f"got {self.output_format!r}")
        if self.micro_batch_size < 1 or self.workers < 1:
            raise ConfigError("micro_batch_size and workers must be at least 1")
        if self.decode_processes is not None and self.decode_processes < 0:
            raise ConfigError(f"decode_processes must be >= 0, got {self.decode_processes}")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise ConfigError(f"shard {self.shard[0]}/{self.shard[1]}: want I/N with 0 <= I < N")
        if self.sync_interval < 0:
            raise ConfigError(f"sync_interval must be >= 0, got {self.sync_interval}")
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

    def identity(self) -> dict:
        """The options that decide what the output holds (the job record compares them): all
        but where the job reads and writes, and how fast it goes."""
        fields = dataclasses.asdict(self)
        for name in ("tables", "outputs", "micro_batch_size", "workers", "decode_processes", "sync_interval"):
            del fields[name]
        fields["input_schema"] = str(self.input_schema)
        return fields

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
    syncs: int = 0  # job records saved (each after an fsync of the outputs)
    sync_seconds: float = 0.0  # time those fsyncs and saves took
    wall_s: float = 0.0  # the job's wall time (this run of it), 0 where not measured
    # Of that, the time the model waited for the next decoded row: what faster input would save.
    input_wait_s: float = 0.0

    def summary(self) -> str:
        done = f"captioned {self.written} rows into {self.outputs}"
        if not self.wall_s:
            return done
        return f"{done} in {self.wall_s:.1f} s (input wait {self.input_wait_s / self.wall_s:.1%} of wall time)"


class StoppedAtBadRow(V2TError):
    """--on_error fail met a bad row: the job stopped and wrote nothing."""


class DecodeWorkerDied(V2TError):
    """A frame-decoding process died (killed for memory, or a crash in an image library)."""


class _InOrder:
    """Captions finish out of input order (continuous batching); rows are written in it, and so
    are bad rows' reports, so both files always hold exactly the rows before one input position
    (`frontier`): what the job record needs to resume. A row waits here until every row before
    it is written or reported; how many wait is bounded by how many short captions can pass one
    long one, and they hold only their output columns."""

    def __init__(self, out: TableOutput, opts: PredictOptions, progress, journal: "_Journal | None"):
        self._out, self._opts, self._progress, self._journal = out, opts, progress, journal
        self._waiting: dict[int, list] = {}  # number in this run → [row or RowError, captions, next position]
        self._next = 0
        self.frontier: TablePosition | None = None  # the first input row not yet written or reported

    def expect(self, seq: int, row: TableRow, after: TablePosition | None) -> None:
        self._waiting[seq] = [row, None, after]

    def skip(self, seq: int, error: RowError, after: TablePosition | None) -> None:
        self._waiting[seq] = [error, None, after]
        self._flush()

    def done(self, seq: int, captions: list[str]) -> None:
        self._waiting[seq][1] = captions
        self._flush()

    def _flush(self) -> None:
        while self._next in self._waiting:
            item, captions, after = self._waiting[self._next]
            if isinstance(item, RowError):
                self._out.add_error(item.line_no, item.idx, item.reason)
            elif captions is None:
                break  # its caption is not finished yet
            else:
                self._out.write_row(_output_fields(item, captions, self._opts))
            del self._waiting[self._next]
            self._next += 1
            self.frontier = after
            if self._progress is not None:
                self._progress(1)
        if self._journal is not None:
            self._journal.maybe_save(self._out, self.frontier)


class _Journal:
    """Saves the job record (journal.py) after an fsync of the outputs, at most every
    `interval` seconds: a crash then costs at most that long of captioning, redone on resume."""

    def __init__(self, opts: PredictOptions, identity: dict, stop: TablePosition | None):
        self.outputs, self.identity, self.stop, self.interval = opts.outputs, identity, stop, opts.sync_interval
        self._last = time.monotonic()

    def maybe_save(self, out: TableOutput, frontier: TablePosition | None) -> None:
        if frontier is not None and time.monotonic() - self._last >= self.interval:
            self.save(out, frontier)

    def save(self, out: TableOutput, frontier: TablePosition | None, complete: bool = False) -> None:
        if frontier is None:
            return  # nothing finished yet: an earlier record (or none) stays right
        began = time.monotonic()
        out.sync()
        rows_bytes, errors_bytes = out.sizes
        report = out.report
        progress = Progress(frontier, report.written, report.failed, rows_bytes, errors_bytes)
        JobRecord(self.identity, progress, complete, self.stop).save(self.outputs)
        self._last = time.monotonic()
        report.syncs += 1
        report.sync_seconds += self._last - began


def predict_tables(captioner: Captioner, opts: PredictOptions, progress=None,
                   rows: Iterable[TableRow | RowError] | None = None, model_dir: str | Path | None = None,
                   resume: bool = False, overwrite: bool = True) -> PredictReport:
    """Run the whole job. With on_error == "fail" the first bad row stops it (StoppedAtBadRow,
    no output left); otherwise every bad row goes to the error report and the job goes on.
    `rows`, when given, replaces reading `opts.tables` (`predict_videos` passes the rows it makes).

    Over tables, the job keeps a record (``OUTPUTS.job.json``, journal.py) of what it is and how
    far it has durably got; `resume` continues the recorded job (ConfigError when the inputs,
    the model in `model_dir` or an option changed). Without `resume`, an interrupted job's
    partial output is replaced only with `overwrite`. SIGINT and SIGTERM finish the captions in
    flight, save the record and raise `Interrupted`."""
    began = time.monotonic()
    cfg = captioner.config
    opts = dataclasses.replace(opts, precision=getattr(captioner.backend, "precision", None))
    opts.check_model(cfg)
    captioner.max_new_tokens(opts.text_len)  # a text_len the model cannot take fails before any work
    if opts.output_format == "easynlp":
        # EasyNLP's caption text as well as its list syntax: files then compare byte for byte.
        captioner = Captioner(captioner.backend, captioner.tokenizer.with_decode_style("easynlp"))
    plan = _plan(opts, rows, model_dir, resume)
    report = PredictReport(outputs=opts.outputs, written=plan.written, failed=plan.failed)
    existing = "resume" if resume else "replace" if overwrite else "refuse"
    decode = FrameDecoder.for_job(opts, cfg)
    pool, window = _decode_pool(opts, decode)
    with TableOutput(report, existing, plan.resume_at) as out, pool, _StopRequest() as stop:
        in_order = _InOrder(out, opts, progress, plan.journal)
        in_order.frontier = plan.start
        if plan.journal is not None:
            plan.journal.save(out, plan.start)  # from now on, --resume finds the job
        decoded = decoded_rows(pool, decode, plan.source, window)
        videos = _videos(decoded, opts, in_order, report, stop)
        try:
            for seq, captions in captioner.caption_stream(videos, opts.search, opts.text_len,
                                                          slots=opts.micro_batch_size):
                in_order.done(seq, captions)
                out.flush()
        except RowError as err:
            out.discard()
            record_path(opts.outputs).unlink(missing_ok=True)
            where = ", ".join(opts.tables) or "the videos"
            raise StoppedAtBadRow(f"bad row in {where}, {err}; no output written "
                                  "(use --on_error skip to leave bad rows out)") from None
        except BrokenProcessPool:
            _decode_worker_died(plan, in_order, out)
        if stop.signal is not None:
            _interrupted(plan, in_order, out, stop.signal)
        if plan.journal is not None:
            plan.journal.save(out, in_order.frontier, complete=True)
        out.commit()
        if plan.journal is not None and opts.shard is None:
            record_path(opts.outputs).unlink(missing_ok=True)  # a finished output needs no record
    report.wall_s = time.monotonic() - began
    if report.rows_padded:
        log.warning("%d rows had fewer than frame_num=%d frames and were padded by repeating their "
                    "last frame", report.rows_padded, opts.frame_num or cfg.frame_num)
    return report


def _decode_worker_died(plan: "_Plan", in_order: _InOrder, out: TableOutput) -> NoReturn:
    kept = f"the {out.report.written} rows finished are in {out.report.outputs}.partial"
    if plan.journal is not None:
        plan.journal.save(out, in_order.frontier)
        kept += "; run the same command with --resume to finish the job"
    raise DecodeWorkerDied(f"a process decoding frames died (killed for memory, or a crash in an image "
                           f"library): {kept} (--decode_processes 0 decodes in threads)") from None


def _interrupted(plan: "_Plan", in_order: _InOrder, out: TableOutput, signum: int) -> None:
    name = signal.Signals(signum).name
    if plan.journal is None:
        raise Interrupted(f"stopped by {name}; the {out.report.written} rows finished are in "
                          f"{out.report.outputs}.partial (jobs over --videos cannot be resumed)", signum)
    plan.journal.save(out, in_order.frontier)
    raise Interrupted(f"stopped by {name} after {out.report.written} rows; they are kept in "
                      f"{out.report.outputs}.partial: run the same command with --resume to finish "
                      "the job", signum)


@dataclass
class _Plan:
    """Where a job reads from and what it has already done."""
    source: Iterable[PlacedRow]
    journal: _Journal | None = None
    written: int = 0
    failed: int = 0
    resume_at: tuple[int, int] = (0, 0)
    start: TablePosition | None = None  # where the job (or this part of it) begins


def _plan(opts: PredictOptions, rows, model_dir, resume: bool) -> _Plan:
    if rows is not None:
        if resume or opts.shard is not None:
            raise ConfigError("--resume and --shard need --tables (make a table of the videos first "
                              "with `v2t make-table`)")
        return _Plan((PlacedRow(item, i, None) for i, item in enumerate(rows)))
    if model_dir is None:
        if resume or opts.shard is not None:
            raise ConfigError("resume and shards need model_dir (the export the job runs), which "
                              "the job record names")
        return _Plan(read_tables(opts.tables, opts.input_schema, opts.max_row_bytes))
    identity = job_identity(list(opts.tables), model_dir, opts.identity())
    start = stop = None
    if opts.shard is not None:
        start, stop = shard_bounds(opts.tables, *opts.shard)
    journal = _Journal(opts, identity, stop)
    if not resume:
        source = read_tables(opts.tables, opts.input_schema, opts.max_row_bytes, start, stop)
        return _Plan(source, journal, start=start or TablePosition())
    record = JobRecord.load(opts.outputs)
    record.check_same_job(identity)
    done = record.progress
    if record.complete:
        raise ConfigError(f"nothing to resume: the job writing {opts.outputs} finished")
    source = read_tables(opts.tables, opts.input_schema, opts.max_row_bytes, done.next, stop)
    log.info("resuming after %d rows written and %d reported", done.written, done.failed)
    return _Plan(source, journal, done.written, done.failed, (done.rows_bytes, done.errors_bytes), done.next)


class Interrupted(V2TError):
    """SIGINT or SIGTERM stopped the job after the captions in flight; its record is saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # what a shell reports for a process the signal ended


class _StopRequest:
    """While active (in the main thread), the first SIGINT or SIGTERM asks the job to stop
    taking rows (`signal` is set); a second one acts as if v2t had not caught the first."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self._SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signal = signum
        log.warning("%s: finishing the captions in flight, then stopping (again to stop at once)",
                    signal.Signals(signum).name)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc_info) -> None:
        self._restore()


def _decode_pool(opts: PredictOptions, decode: FrameDecoder) -> tuple[DecodePool, int]:
    """The pool that decodes rows ahead of the model, and how many rows ahead it reads."""
    processes = decode_processes(opts.decode_processes)
    if processes:
        log.info("decoding frames in %d processes", processes)
    # Enough rows decoded ahead for two whole refills of the slots, so the model does not wait on
    # JPEG decoding: where the backend encodes ahead (generator.EncodeAhead), rows are taken a
    # whole refill at a time, and the next refill's rows must already be decoding.
    window = 2 * opts.micro_batch_size + 2 * (processes or opts.workers)
    return DecodePool(processes, opts.workers, decode.crop_shape, rows_per_task(window, processes)), window


def _videos(decoded: Iterator[Decoded], opts: PredictOptions, in_order: _InOrder,
            report: PredictReport, stop: _StopRequest) -> Iterator[tuple[int, np.ndarray, SearchOptions]]:
    """(input number, uint8 crops (F, 3, S, S), search) of the good rows: the backend normalizes
    them (a quarter of the bytes a float32 copy would be, to hold and to move to a GPU). Bad rows
    go to the error report (or, with on_error fail, stop the job). Stops taking rows once a stop
    is requested."""
    for seq, d in enumerate(_waited_for(decoded, report)):
        if stop.signal is not None:
            return
        after = d.placed.next
        if d.error is None:
            report.rows_padded += d.padded > 0
            in_order.expect(seq, _output_columns(d.placed.item, opts), after)
            yield seq, d.pixels, row_search(opts.search, d.placed.key)
        elif opts.on_error == "fail":
            raise d.error
        else:
            log.error("skipping %s", d.error)
            in_order.skip(seq, d.error, after)


def _waited_for(items: Iterator[T], report: PredictReport) -> Iterator[T]:
    """`items`, adding to report.input_wait_s the time each took to arrive: reading the row, and
    whatever of its decoding was not done ahead. The model waits that long for its input."""
    while True:
        began = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        finally:
            report.input_wait_s += time.perf_counter() - began
        yield item


def row_search(search: SearchOptions, key: int) -> SearchOptions:
    """The search of the row whose line is number `key` among all the tables' lines. Seeded
    sampling draws from streams keyed by the job's seed and that number, not by the order rows
    reach the model, so a resumed job or the shards of one draw what the whole job would."""
    if not search.do_sample or search.seed is None:
        return search
    row_seed = np.random.SeedSequence([search.seed, key]).generate_state(2, np.uint64)
    return dataclasses.replace(search, seed=int(row_seed[0]) << 64 | int(row_seed[1]))


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

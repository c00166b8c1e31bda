"""Predict on a Ray cluster (the ``ray`` extra): the pieces of `v2t predict` as Ray Data stages.

    tables ──► TablesSource ──► decode_frames ──► CaptionActor ──► driver: rows in input order
              (tasks over byte     (CPU tasks: frames →   (actor pool, one model   (OUTPUTS +
               ranges, local        uint8 crops; bad rows   load per actor, a GPU    errors.tsv, as
               predict's reader)    marked, not dropped)    each where there are)    locally)

`predict_tables_ray` runs the whole job (what ``v2t predict --ray`` calls). Users who build
their own pipelines take the stages:

    import ray, v2t_engine.ray as vr
    ds = vr.read_tables_ray(["test.txt"], schema)
    ds = ds.map_batches(vr.decode_frames, fn_args=(opts, cfg), batch_format="pyarrow")
    ds = ds.map_batches(vr.CaptionActor, fn_constructor_args=(export_dir, opts), batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=2), num_gpus=1)

Every row travels with its line's global number (KEY), its line number and idx; a bad row
carries its reason in the ERROR column instead of frames or captions, so the writer reports it
exactly where local predict would. Ray Data restarts a dead actor and runs its batch again, and the driver writes
rows by position, so a worker that dies loses and duplicates nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .config import ModelConfig
from .errors import ConfigError, RowError, import_optional
from .inputs.tables import DEFAULT_MAX_ROW_BYTES, InputSchema, TableRow
from .inputs.writer import TableOutput
from .inputs.table_ranges import PlacedRow, read_tables, shard_bounds
from .jobs.decoding import FrameDecoder
from .jobs.predict import PredictOptions, PredictReport, StoppedAtBadRow, _output_fields, row_search
from .runtime.captioner import Captioner
from .runtime.manifest import Manifest, is_export_dir

INSTALL = "pip install 'v2t[ray]'"
ray = import_optional("ray", "predicting on Ray", INSTALL)
import_optional("ray.data", "predicting on Ray", INSTALL)  # ray without its data extra lacks pyarrow
import pyarrow as pa  # noqa: E402  (ray.data brings it)
from ray.data import DataContext, Datasource, ReadTask  # noqa: E402
from ray.data.block import BlockMetadata  # noqa: E402

log = logging.getLogger(__name__)

# Columns the stages add beside the table's own (names no EasyNLP schema uses).
KEY, LINE, IDX, ERROR = "__v2t_key", "__v2t_line", "__v2t_idx", "__v2t_error"
PIXELS, PADDED, CAPTIONS = "__v2t_pixels", "__v2t_padded", "__v2t_captions"
# A read task hands on a block when it holds this many rows or bytes, whichever comes first: rows
# of base64 frames run to megabytes, and a block is what a worker holds at once.
BLOCK_ROWS, BLOCK_BYTES = 64, 32 << 20
READ_CPUS = 0
READ_PART_BYTES = 256 << 20
# What a decode worker holds beside its batch: a Python process with numpy, PIL and pyarrow.
DECODE_WORKER_BYTES = 512 << 20


# ------------------------------------------------------------------------------------ reading
class TablesSource(Datasource):
    """EasyNLP tables as a Ray dataset, read by `parts` tasks that each stream one byte range of
    the tables (the ranges `--shard` uses, `inputs/table_ranges.py`) with local predict's reader,
    so rows, row numbers, bad-row reasons and each line's global number (KEY, which keys seeded
    sampling) are the same. Columns: KEY, LINE, IDX, ERROR (null for a good row) and the schema's
    columns as text (null for a bad row). Tables must be regular files that every node can read
    at the same path."""

    def __init__(self, tables: Sequence[str], schema: InputSchema, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
                 parts: int = 1):
        self.tables, self.schema, self.max_row_bytes = [str(t) for t in tables], schema, max_row_bytes
        self.parts = parts
        shard_bounds(self.tables, 0, 1)  # a missing table or a pipe fails now, on the driver

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(Path(t).stat().st_size for t in self.tables)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        size = self.estimate_inmemory_data_size() // self.parts
        meta = BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=tuple(self.tables))
        return [ReadTask(lambda part=part: self._blocks(part), meta) for part in range(self.parts)]

    def _blocks(self, part: int) -> Iterator[pa.Table]:
        # Each task finds its own bounds: the scans for line numbers run in parallel, on workers.
        start, stop = shard_bounds(self.tables, part, self.parts)
        rows, size = [], 0
        for placed in read_tables(self.tables, self.schema, self.max_row_bytes, start, stop):
            rows.append(placed)
            size += sum(map(len, placed.item.fields.values())) if isinstance(placed.item, TableRow) else 0
            if len(rows) >= BLOCK_ROWS or size >= BLOCK_BYTES:
                yield self._block(rows)
                rows, size = [], 0
        if rows:
            yield self._block(rows)

    def _block(self, placed: list[PlacedRow]) -> pa.Table:
        items = [p.item for p in placed]
        good = [isinstance(i, TableRow) for i in items]
        columns = {KEY: pa.array([p.key for p in placed], pa.int64()),
                   LINE: pa.array([i.line_no for i in items], pa.int64()),
                   IDX: pa.array([i.idx for i in items], pa.string()),
                   ERROR: pa.array([None if ok else i.reason for i, ok in zip(items, good)], pa.string())}
        for name in self.schema.names:
            # large_string: one block of long base64 rows can pass string's 2 GiB offsets.
            columns[name] = pa.array([i.fields[name] if ok else None for i, ok in zip(items, good)],
                                     pa.large_string())
        return pa.table(columns)


def read_tables_ray(tables: Sequence[str], schema: InputSchema, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
                    parts: int = 1):
    """The rows of `tables`, in order, as a Ray dataset (`TablesSource`)."""
    return ray.data.read_datasource(TablesSource(tables, schema, max_row_bytes, parts), num_cpus=READ_CPUS)


# ------------------------------------------------------------------------------------ stages
def _item(row: dict) -> TableRow | RowError:
    if row[ERROR] is not None:
        return RowError(row[LINE], row[IDX], row[ERROR])
    return TableRow(row[LINE], {k: v for k, v in row.items() if not k.startswith("__v2t_")})


def _kept_columns(opts: PredictOptions) -> list[str]:
    """The table columns the output needs (not the frames, unless asked for)."""
    return list(dict.fromkeys(c for c in (*opts.output_schema, *opts.append_cols) if c in opts.input_schema.names))


def decode_frames(batch: pa.Table, opts: PredictOptions, cfg: ModelConfig) -> pa.Table:
    """map_batches stage for CPU tasks (pyarrow batches): the frames column → PIXELS, uint8
    (F, 3, S, S) as bytes, with local predict's decoder (`jobs.decoding.FrameDecoder`); a row whose
    frames are bad gets its reason in ERROR. The frames column is dropped unless the output
    asks for it."""
    decode = FrameDecoder.for_job(opts, cfg)
    decoded = [decode(_item(row)) for row in batch.to_pylist()]
    columns = {c: batch.column(c) for c in (KEY, LINE, IDX, *_kept_columns(opts))}
    columns[ERROR] = pa.array([d.error.reason if d.error is not None else None for d in decoded], pa.string())
    columns[PIXELS] = pa.array([d.pixels.tobytes() if d.error is None else None for d in decoded], pa.large_binary())
    columns[PADDED] = pa.array([d.padded > 0 for d in decoded], pa.bool_())
    return pa.table(columns)


class CaptionActor:
    """map_batches stage for an actor pool (pyarrow batches): loads the model once, captions the
    good rows of each batch with continuous batching and adds CAPTIONS (the candidates of each
    row; null for a bad row). PIXELS is dropped."""

    def __init__(self, checkpoint_dir: str, opts: PredictOptions, backend: str = "auto", device: str = "cpu",
                 threads: int | None = None, verify: bool = False):
        captioner = Captioner.load(checkpoint_dir, backend=backend, device=device, threads=threads, verify=verify)
        if opts.output_format == "easynlp":
            captioner = Captioner(captioner.backend, captioner.tokenizer.with_decode_style("easynlp"))
        self.captioner, self.opts = captioner, opts
        cfg = captioner.config
        self.shape = (opts.frame_num or cfg.frame_num, 3, cfg.img_size, cfg.img_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys, pixels = batch.column(KEY).to_pylist(), batch.column(PIXELS).to_pylist()
        search = self.opts.search
        # (row in batch, uint8 crops, the row's search; the backend normalizes): seeded sampling
        # keyed by the line's global number, as local predict keys it, so the batch a row lands in
        # changes nothing.
        videos = ((i, np.frombuffer(p, np.uint8).reshape(self.shape), row_search(search, keys[i]))
                  for i, p in enumerate(pixels) if p is not None)
        captions: list[list[str] | None] = [None] * len(pixels)
        for i, candidates in self.captioner.caption_stream(videos, search, self.opts.text_len,
                                                           slots=self.opts.micro_batch_size):
            captions[i] = candidates
        return batch.drop_columns([PIXELS]).append_column(CAPTIONS, pa.array(captions, pa.list_(pa.string())))


# ------------------------------------------------------------------------------------ the job
@dataclasses.dataclass(frozen=True)
class RayOptions:
    """How the job uses the cluster. actors: caption actors (None: one per GPU where the cluster
    has GPUs, else one); actor_cpus: CPUs each reserves (None: `threads`, else 1); rows_per_batch:
    rows an actor captions per call (None: 16 x micro_batch_size), large enough that continuous
    batching keeps the slots full, small enough that a retried batch is little work lost."""

    actors: int | None = None
    actor_cpus: float | None = None
    rows_per_batch: int | None = None
    decode_rows_per_batch: int = 64
    read_parts: int | None = None  # byte ranges read in parallel (None: see `_read_parts`)

    def __post_init__(self) -> None:
        for name in ("actors", "actor_cpus", "rows_per_batch", "read_parts"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.decode_rows_per_batch < 1:
            raise ConfigError(f"decode_rows_per_batch must be positive, got {self.decode_rows_per_batch}")


def model_config(checkpoint_dir: str | Path) -> ModelConfig:
    """The model config of an export (its manifest) or a checkpoint (config.json), without
    loading the model: the driver checks the options and sizes the frames with it."""
    path = Path(checkpoint_dir)
    return Manifest.load(path).config if is_export_dir(path) else ModelConfig.load(path)


def predict_tables_ray(checkpoint_dir: str, opts: PredictOptions, address: str | None = None,
                       backend: str = "auto", device: str = "cpu", threads: int | None = None,
                       verify: bool = False, cluster: RayOptions = RayOptions(), progress=None,
                       overwrite: bool = True) -> PredictReport:
    """`predict_tables` on a Ray cluster: the same OUTPUTS and OUTPUTS.errors.tsv, byte for byte
    (seeded sampling included: it is keyed by each line's global number). `address`: the cluster
    to join (None: RAY_ADDRESS, else a cluster started on this machine, else a new local one);
    a Ray session already initialized in this process is used as it is. An interrupted job's
    OUTPUTS.partial is replaced only with `overwrite`; the Ray path keeps no job record, so
    `--resume` does not apply to it (a dead worker is retried instead)."""
    cfg = model_config(checkpoint_dir)
    opts.check_model(cfg)
    # The text_len check needs only the config: fail here, before any actor loads the model.
    Captioner.max_new_tokens(SimpleNamespace(config=cfg), opts.text_len)
    if opts.shard is not None:
        raise ConfigError("the Ray path reads every table: run shards (--shard) as separate local jobs")
    shard_bounds(opts.tables, 0, 1)  # a missing table or a pipe fails before Ray starts
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        with _data_context():
            rows = _pipeline(checkpoint_dir, opts, cfg, dict(backend=backend, device=device,
                             threads=threads, verify=verify), cluster)
            report = _write(rows, opts, progress, "replace" if overwrite else "refuse")
    finally:
        if started:
            ray.shutdown()
    if report.rows_padded:
        log.warning("%d rows had fewer than frame_num=%d frames and were padded by repeating their "
                    "last frame", report.rows_padded, opts.frame_num or cfg.frame_num)
    return report


@contextlib.contextmanager
def _data_context():
    """Rows in input order, and no Ray progress bars or plans printed beside predict's own
    output; restored afterwards."""
    ctx = DataContext.get_current()
    names = ("enable_progress_bars", "print_on_execution_start")
    saved = ctx.execution_options.preserve_order, [getattr(ctx, n) for n in names]
    ctx.execution_options.preserve_order = True
    for name in names:
        setattr(ctx, name, False)
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = saved[0]
        for name, value in zip(names, saved[1]):
            setattr(ctx, name, value)


def _read_parts(tables: Sequence[str], cluster: RayOptions) -> int:
    """Byte ranges to read in parallel: one per READ_PART_BYTES of input, at most one per CPU of
    the cluster (each range's task first scans its range's start for line numbers)."""
    if cluster.read_parts is not None:
        return cluster.read_parts
    size = sum(Path(t).stat().st_size for t in tables)
    return max(1, min(int(ray.cluster_resources().get("CPU", 1)), size // READ_PART_BYTES))


def _pipeline(checkpoint_dir: str, opts: PredictOptions, cfg: ModelConfig,
              load: dict, cluster: RayOptions) -> Iterator[dict]:
    gpus = int(ray.cluster_resources().get("GPU", 0)) if load["device"] != "cpu" else 0
    actors = cluster.actors or max(1, gpus)
    cpus = cluster.actor_cpus or load["threads"] or 1
    # Reading is I/O: its tasks reserve no CPU, so a read task paused by backpressure never
    # holds the CPU the decode tasks it waits for need.
    ds = read_tables_ray(opts.tables, opts.input_schema, opts.max_row_bytes, _read_parts(opts.tables, cluster))
    # Decoding runs in tasks of its own, beside the actors. Ray Data fuses stages whose resource
    # requests are equal, which would move the decoding into the caption actors, where it holds
    # up the model; the decode tasks' memory request (a worker process and the frames it writes)
    # keeps them apart.
    frames = (opts.frame_num or cfg.frame_num) * 3 * cfg.img_size ** 2 * cluster.decode_rows_per_batch
    ds = ds.map_batches(decode_frames, fn_args=(opts, cfg), batch_format="pyarrow", num_cpus=1,
                        batch_size=cluster.decode_rows_per_batch, memory=DECODE_WORKER_BYTES + 2 * frames)
    ds = ds.map_batches(CaptionActor, fn_constructor_args=(str(checkpoint_dir), opts),
                        fn_constructor_kwargs=load, batch_format="pyarrow",
                        batch_size=cluster.rows_per_batch or 16 * opts.micro_batch_size,
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus,
                        num_gpus=1 if gpus else 0)
    return ds.iter_rows()


def _write(rows: Iterator[dict], opts: PredictOptions, progress, existing: str) -> PredictReport:
    """Rows arrive in input order (preserve_order): write each, or report it as local predict does."""
    report = PredictReport(outputs=opts.outputs)
    with TableOutput(report, existing) as out:
        for row in rows:
            if row[ERROR] is None:
                report.rows_padded += bool(row[PADDED])
                out.write_row(_output_fields(_item(row), list(row[CAPTIONS]), opts))
                out.flush()  # as local predict does: an interrupted job keeps its finished rows
            elif opts.on_error == "fail":
                out.discard()
                raise StoppedAtBadRow(f"bad row in {', '.join(opts.tables)}, {_item(row)}; no output written "
                                      "(use --on_error skip to leave bad rows out)")
            else:
                log.error("skipping %s", _item(row))
                out.add_error(row[LINE], row[IDX], row[ERROR])
            if progress is not None:
                progress(1)
        out.commit()
    return report

"""Training data: an EasyNLP table as a map-style torch Dataset of (frames, caption tokens).

Decoding JPEG/PNG frames is by far the slowest part of a small training run on a CPU, and every
epoch would otherwise redo it. So when the decoded crops of the whole table fit a memory budget
(uint8, ``rows x frame_num x 3 x S x S`` bytes), each row is decoded exactly once, at
construction, and epochs only index the cache and normalize a batch. Tables too big for the
budget are decoded lazily, per batch, in DataLoader workers: the first pass then only records
where each row starts in the file.

Bad rows never stop training. In cached mode they are found up front, skipped and counted in one
warning naming the first line numbers. In lazy mode a row that fails to decode is replaced by the
next good row (so every batch keeps its size, which DistributedDataParallel needs: all ranks must
take the same number of steps) and logged by the worker that met it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from v2t_engine.concurrency import map_ahead
from v2t_engine.errors import RowError, TableError
from v2t_engine.inputs.frames import FrameSource, row_frames_or_error
from v2t_engine.inputs.preprocess import normalize
from v2t_engine.inputs.tables import (DEFAULT_MAX_ROW_BYTES, InputSchema, TableRow, count_lines, parse_line,
                                      read_lines, read_table)
from v2t_engine.tokenizer import CaptionTokenizer

from v2t_training.options import DEFAULT_CACHE_BUDGET

log = logging.getLogger(__name__)

_SHOWN_LINES = 5  # bad rows named in the warning; the rest are only counted

# One batch: normalized frames (B, F, 3, S, S) float32 and tokens (B, text_len) int64.
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DataSpec:
    """What to read from each row and how to shape it."""

    frames_column: str
    text_column: str
    frame_num: int
    img_size: int
    text_len: int
    source: FrameSource = field(default_factory=FrameSource)
    # Longer table lines are bad rows, skipped in chunks and never held in memory (as in predict).
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES

    @property
    def row_bytes(self) -> int:
        """Bytes of one row's decoded uint8 crops."""
        return self.frame_num * 3 * self.img_size * self.img_size


def read_captions(paths: Iterable[str | Path], schema: InputSchema, text_column: str) -> Iterator[str]:
    """Stream the captions of some tables (to train a tokenizer); malformed rows are skipped here
    and reported by the dataset."""
    schema.position(text_column)  # a clear ConfigError before reading anything
    for path in paths:
        for row in read_table(path, schema):
            if isinstance(row, TableRow):
                yield row.fields[text_column]


class CaptionDataset(Dataset):
    """Rows of one table as (frames float32 (F, 3, S, S) CLIP-normalized, tokens int64 (T,)).

    ``__getitems__`` fetches a whole batch at once (one fancy index into the cache and one
    ``normalize`` call instead of B small ones); DataLoader uses it automatically.
    """

    def __init__(self, path: str | Path, schema: InputSchema, spec: DataSpec, tokenizer: CaptionTokenizer,
                 cache_budget_bytes: int = DEFAULT_CACHE_BUDGET, decode_threads: int = 2):
        self.path = Path(path)
        self.schema = schema
        self.spec = spec
        schema.position(spec.frames_column)
        schema.position(spec.text_column)
        estimate = count_lines(self.path) * spec.row_bytes  # lines: an upper bound on rows, found without parsing
        self.cached = estimate <= cache_budget_bytes
        self._cache: np.ndarray | None = None  # (N, F, 3, S, S) uint8 in cached mode
        self._offsets: list[int] = []  # byte offset of each kept row's line, lazy mode
        self.line_nos: list[int] = []  # table line number of each kept row
        self.padded_rows = 0
        self.bad_rows: list[RowError] = []
        if self.cached:
            log.info("%s: decoding every row once and keeping the crops in memory "
                     "(about %.1f MiB, budget %.0f MiB)", self.path, estimate / 2**20, cache_budget_bytes / 2**20)
            captions = self._decode_all(decode_threads)
        else:
            log.info("%s: decoded crops would take about %.0f MiB (budget %.0f MiB); decoding lazily per batch",
                     self.path, estimate / 2**20, cache_budget_bytes / 2**20)
            captions = self._index_rows()
        if not self.line_nos:
            raise TableError(f"table {str(self.path)!r} has no usable rows")
        self.tokens = tokenizer.encode_batch(captions, spec.text_len)  # (N, T) int64
        self._report()
        self._bad_seen: set[int] = set()  # lazy mode: indices this process found undecodable

    # ------------------------------------------------------------------ construction
    def _decode_all(self, threads: int) -> list[str]:
        spec = self.spec
        # PIL releases the GIL while decoding and resizing, so a small thread pool helps; the
        # window bounds how many rows (base64 text) are held at once.
        crops: list[np.ndarray] = []
        captions: list[str] = []

        def decode(row: TableRow | RowError):
            if isinstance(row, RowError):
                return row, None
            try:
                return row, row_frames_or_error(row, spec.frames_column, spec.frame_num, spec.img_size, spec.source)
            except RowError as err:
                return err, None

        with ThreadPoolExecutor(max(1, threads)) as pool:
            rows = read_table(self.path, self.schema, self.spec.max_row_bytes)
            for row, result in map_ahead(pool, decode, rows, 64):
                if result is None:
                    self.bad_rows.append(row)
                    continue
                frames, padded = result
                crops.append(frames)
                captions.append(row.fields[spec.text_column])
                self.line_nos.append(row.line_no)
                self.padded_rows += padded > 0
        if crops:
            self._cache = np.stack(crops)  # (N, F, 3, S, S)
        return captions

    def _index_rows(self) -> list[str]:
        """Lazy mode: remember each good row's byte offset, in one pass of the table reader
        itself (same line numbering, same max_row_bytes: an over-long line is a bad row, read
        past in chunks, never held)."""
        captions = []
        for row, start, _ in read_lines(self.path, self.schema, self.spec.max_row_bytes):
            if row is None:
                continue  # a blank line
            if isinstance(row, RowError):
                self.bad_rows.append(row)
                continue
            captions.append(row.fields[self.spec.text_column])
            self.line_nos.append(row.line_no)
            self._offsets.append(start)
        return captions

    def _report(self) -> None:
        if self.bad_rows:
            shown = ", ".join(str(e.line_no) for e in self.bad_rows[:_SHOWN_LINES])
            more = "" if len(self.bad_rows) <= _SHOWN_LINES else f" and {len(self.bad_rows) - _SHOWN_LINES} more"
            log.warning("%s: skipped %d bad rows (lines %s%s); first: %s",
                        self.path, len(self.bad_rows), shown, more, self.bad_rows[0])
        if self.padded_rows:
            log.warning("%s: %d rows have fewer than frame_num=%d frames; their last frame was repeated",
                        self.path, self.padded_rows, self.spec.frame_num)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.line_nos)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        frames, tokens = self.__getitems__([i])
        return frames[0], tokens[0]

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        indices = [int(i) for i in indices]
        if self._cache is not None:
            raw = self._cache[indices]  # (B, F, 3, S, S) uint8, one copy
        else:
            loaded = [self._decode_lazily(i) for i in indices]
            indices = [j for j, _ in loaded]  # a bad row's place is taken by the next good one
            raw = np.stack([frames for _, frames in loaded])  # (B, F, 3, S, S) uint8
        return torch.from_numpy(normalize(raw)), torch.from_numpy(self.tokens[indices])

    def _decodable(self, i: int) -> int:
        """i, or the next index this process has not found undecodable (lazy mode)."""
        for step in range(len(self)):
            j = (i + step) % len(self)
            if j not in self._bad_seen:
                return j
        raise TableError(f"no row of {str(self.path)!r} could be decoded")

    def _decode_lazily(self, i: int) -> tuple[int, np.ndarray]:
        """(index actually used, its uint8 crops): row i, or the next row that decodes."""
        spec = self.spec
        for _ in range(len(self)):
            i = self._decodable(i)
            try:
                frames, padded = row_frames_or_error(self._read_row(i), spec.frames_column, spec.frame_num,
                                                     spec.img_size, spec.source)
            except RowError as err:
                self._bad_seen.add(i)
                log.warning("%s: skipping bad row %s (replaced by the next row)", self.path, err)
                continue
            if padded:
                log.debug("%s line %d: %d frames padded", self.path, self.line_nos[i], padded)
            return i, frames
        raise TableError(f"no row of {str(self.path)!r} could be decoded")

    def _read_row(self, i: int) -> TableRow:
        """Row i, parsed as read_table parsed it; a RowError when the line no longer parses (the
        table changed since it was indexed)."""
        # One open per row: cheap next to decoding, and nothing unpicklable lives on the dataset
        # that DataLoader workers receive.
        with open(self.path, "rb") as f:
            f.seek(self._offsets[i])
            raw = f.readline(self.spec.max_row_bytes + 1)
        if len(raw) > self.spec.max_row_bytes and not raw.endswith(b"\n"):
            raise RowError(self.line_nos[i], None, f"the line is longer than {self.spec.max_row_bytes} bytes "
                                                   "(max_row_bytes) now; the table changed while training")
        row = parse_line(raw, self.line_nos[i], self.schema)
        if row is None:
            raise RowError(self.line_nos[i], None, "the line is blank now; the table changed while training")
        if isinstance(row, RowError):
            raise row
        return row


class ResumableSampler(DistributedSampler):
    """DistributedSampler (one shard per rank, reshuffled by ``set_epoch``, deterministic from
    the seed) that can start part-way through an epoch, so a resumed run sees exactly the
    samples the interrupted run had not reached. Works without a process group when
    ``num_replicas`` and ``rank`` are given."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` samples of this rank's shard in the next epoch only."""
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


def _pass_through(batch: Batch) -> Batch:
    # __getitems__ already returns a collated batch. Module level so workers can pickle it.
    return batch


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler | None = None,
                num_workers: int = 0) -> DataLoader:
    """A DataLoader over a CaptionDataset (or a ConcatDataset of them) yielding Batch tuples."""
    if hasattr(dataset, "__getitems__"):
        collate = _pass_through
    else:  # ConcatDataset: per-item fetch, then stack
        collate = _stack
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, persistent_workers=num_workers > 0)


def _stack(items: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
    return torch.stack([f for f, _ in items]), torch.stack([t for _, t in items])

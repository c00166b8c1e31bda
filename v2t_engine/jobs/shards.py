"""`v2t merge-shards`: the outputs of `v2t predict --shard I/N` laid end to end.

Shards split the tables by bytes into consecutive parts (inputs/table_ranges.py), and each
shard writes its rows and its error report in input order, so the single run's output is the
shards' outputs concatenated in shard order, and the same holds for the error reports. Before
writing anything, the merge checks each shard's job record (journal.py): every shard 0..N-1 of
the same job present exactly once and finished, the last one reaching the end of the inputs,
and every output and report holding exactly the rows its record counted.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from ..inputs.writer import ErrorReport, TableReport
from .journal import JobRecord


class MergeReport(TableReport):
    def summary(self) -> str:
        return f"merged {self.written} rows into {self.outputs}"


def merge_shards(outputs: str, shard_outputs: Sequence[str]) -> TableReport:
    """Merge the finished shard outputs `shard_outputs` (any order) into `outputs`."""
    records = _check_shards(shard_outputs)
    report = MergeReport(outputs=outputs)
    target, errors = Path(outputs), _errors_of(outputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_rows, tmp_errors = target.with_name(target.name + ".partial"), errors.with_name(errors.name + ".partial")
    try:
        with open(tmp_rows, "wb") as rows_out, open(tmp_errors, "wb") as errors_out:
            errors_out.write(ErrorReport.HEADER.encode())
            for path, record in records.items():
                report.written += _copy_lines(Path(path), rows_out, record.progress.written, skip_header=False)
                if record.progress.failed:
                    report.failed += _copy_lines(_errors_of(path), errors_out, record.progress.failed,
                                                 skip_header=True)
    except BaseException:
        tmp_rows.unlink(missing_ok=True)
        tmp_errors.unlink(missing_ok=True)
        raise
    os.replace(tmp_rows, target)
    if report.failed:
        os.replace(tmp_errors, errors)
        report.errors_path = str(errors)
    else:
        tmp_errors.unlink()
        errors.unlink(missing_ok=True)  # a stale report from an earlier run would mislead
    return report


def _errors_of(outputs: str | Path) -> Path:
    return ErrorReport(outputs).path


def _check_shards(shard_outputs: Sequence[str]) -> dict[str, JobRecord]:
    """Shard output → its record, in shard order; ConfigError naming what is wrong."""
    if not shard_outputs:
        raise ConfigError("no shard outputs given")
    by_index: dict[int, tuple[str, JobRecord]] = {}
    count, first = None, None
    for path in shard_outputs:
        record = JobRecord.load(path)
        shard = record.identity["options"].get("shard")
        if not shard:
            raise ConfigError(f"{path} was not written by `v2t predict --shard I/N`")
        index, n = shard
        if not record.complete or not Path(path).is_file():
            raise ConfigError(f"shard {index}/{n} ({path}) has not finished: finish it with --resume")
        same = {**record.identity, "options": {**record.identity["options"], "shard": None}}
        if first is None:
            count, first = n, same
        elif n != count or same != first:
            raise ConfigError(f"{path} belongs to another job than {shard_outputs[0]} (other inputs, "
                              "model, options or shard count)")
        if index in by_index:
            raise ConfigError(f"shard {index}/{n} given twice: {by_index[index][0]} and {path}")
        by_index[index] = (path, record)
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise ConfigError(f"shards {', '.join(f'{i}/{count}' for i in missing)} are missing")
    last = by_index[count - 1][1]
    if last.stop is None or last.stop.table != len(last.identity["inputs"]):
        raise ConfigError(f"shard {count - 1}/{count} does not reach the end of the inputs")
    return {path: record for path, record in (by_index[i] for i in range(count))}


def _copy_lines(path: Path, out, expected: int, skip_header: bool) -> int:
    """Copy the lines of `path` to `out`; ConfigError unless it holds `expected` of them."""
    lines = 0
    with open(path, "rb") as f:
        if skip_header:
            f.readline()
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
            out.write(chunk)
    if lines != expected:
        raise ConfigError(f"{path} holds {lines} rows but its job recorded {expected}: it was changed "
                          "after the shard finished")
    return lines


"""Output files written so that a reader never sees a half-finished table.

Rows go to ``<outputs>.partial`` as they are produced (flushed per batch, so an interrupted job
keeps what it finished) and the file is renamed onto ``<outputs>`` only when the job completes.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..errors import OutputError


class AtomicTableWriter:
    """Rows to ``<outputs>.partial``, renamed onto ``<outputs>`` by `commit`. `resume_at` keeps the
    first bytes of an existing partial file (an interrupted job's durable rows) and appends."""

    def __init__(self, path: str | Path, resume_at: int | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.bytes = 0  # the length of the partial file
        self._resume_at = resume_at
        self._file = None

    def __enter__(self) -> "AtomicTableWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._resume_at is None:
            self._file = open(self.partial, "wb")
        else:
            self._file = _reopen(self.partial, self._resume_at)
            self.bytes = self._resume_at
        return self

    def write_row(self, fields: list[str]) -> None:
        data = ("\t".join(fields) + "\n").encode("utf-8")
        self._file.write(data)
        self.bytes += len(data)

    def flush(self) -> None:
        self._file.flush()

    def sync(self) -> None:
        """Flush and fsync: what was written survives a crash or a power cut."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def commit(self) -> None:
        """Finish: make the output visible under its real name."""
        self._file.close()
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        """Abandon the output (fail-fast mode): nothing partial is left behind."""
        self._file.close()
        self.partial.unlink(missing_ok=True)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # On an unexpected exception or Ctrl-C the .partial file stays: finished rows are kept.
        if self._file is not None and not self._file.closed:
            self._file.close()


def _reopen(path: Path, keep: int):
    """`path` opened for appending after its first `keep` bytes (the rest cut off)."""
    if not path.is_file() or path.stat().st_size < keep:
        raise OutputError(f"cannot resume: {path} is missing or shorter than the {keep} bytes the "
                          "job recorded as written; start over with --overwrite")
    f = open(path, "r+b")
    f.truncate(keep)
    f.seek(keep)
    return f


class ErrorReport:
    """``<outputs>.errors.tsv``: line number, idx and reason of every row left out."""

    HEADER = "line\tidx\treason\n"

    def __init__(self, outputs: str | Path):
        self.path = Path(outputs).with_name(Path(outputs).name + ".errors.tsv")
        self.bytes = 0  # the length of the report file (0: not started)
        self._file = None

    def resume_at(self, keep: int) -> None:
        """Continue an interrupted job's report after its first `keep` bytes (0: none yet)."""
        if keep:
            self._file = _reopen(self.path, keep)
            self.bytes = keep

    def add(self, line_no: int, idx: str | None, reason: str) -> None:
        if self._file is None:
            self._file = open(self.path, "wb")
            self._write(self.HEADER)
        clean = " ".join(reason.split())  # one line per error, whatever the reason text holds
        self._write(f"{line_no}\t{idx or ''}\t{clean}\n")
        self._file.flush()

    def _write(self, text: str) -> None:
        data = text.encode("utf-8", "backslashreplace")
        self._file.write(data)
        self.bytes += len(data)

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self.path.exists():
            self.path.unlink()  # a stale report from an earlier run would mislead


# Exit status of a job that finished with some inputs left out (listed in its error report).
EXIT_SOME_FAILED = 3


@dataclass
class TableReport:
    """What a job that writes a table and an error report did."""

    outputs: str
    written: int = 0  # rows written to the table
    failed: int = 0  # inputs in the error report
    errors_path: str | None = None  # the error report, when there are failures

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed else 0


class TableOutput:
    """A job's output table and its error report together: rows to ``OUTPUTS.partial``, failures
    to ``OUTPUTS.errors.tsv``; `commit` publishes both, `discard` leaves nothing, and an
    interruption keeps the finished rows in ``OUTPUTS.partial``.

    One writer per output: ``OUTPUTS.lock`` is held (flock) while the job runs, so a second job
    on the same outputs is refused instead of interleaving rows. The kernel drops the lock when
    its process dies, so a lock file left by a killed job never blocks the next one. A write
    that fails (disk full, permissions) is an OutputError naming the file, not a traceback."""

    def __init__(self, report: TableReport, existing: str = "replace", resume_at: tuple[int, int] = (0, 0)):
        """`existing`: what to do with an interrupted job's ``OUTPUTS.partial``: "replace" it,
        "refuse" to start (OutputError), or "resume" it, keeping the first `resume_at`
        (rows, errors) bytes of the partial output and the error report."""
        if existing not in ("replace", "refuse", "resume"):
            raise ValueError(f"existing={existing!r}")
        self.report = report
        self._existing, self._resume_at = existing, resume_at
        self._rows = AtomicTableWriter(report.outputs, resume_at[0] if existing == "resume" else None)
        self._errors = ErrorReport(report.outputs)
        self._lock_path = Path(report.outputs).with_name(Path(report.outputs).name + ".lock")
        self._lock = None

    def __enter__(self) -> "TableOutput":
        with self._writing(self._rows.partial):
            self._rows.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _acquire(self._lock_path, self.report.outputs)
            try:
                if self._existing == "refuse" and self._rows.partial.exists():
                    raise OutputError(f"{self._rows.partial} holds the rows of an interrupted job: add "
                                      "--resume to continue it, or --overwrite to start over")
                self._rows.__enter__()
                if self._existing == "resume":
                    self._errors.resume_at(self._resume_at[1])
            except BaseException:
                self._release()
                raise
        return self

    @property
    def sizes(self) -> tuple[int, int]:
        """Bytes written so far to the partial output and to the error report."""
        return self._rows.bytes, self._errors.bytes

    def sync(self) -> None:
        """Make every row and error written so far durable (fsync)."""
        with self._writing(self._rows.partial):
            self._rows.sync()
            self._errors.sync()

    def write_row(self, fields: list[str]) -> None:
        with self._writing(self._rows.partial):
            self._rows.write_row(fields)
        self.report.written += 1

    def add_error(self, line_no: int, idx: str | None, reason: str) -> None:
        with self._writing(self._errors.path):
            self._errors.add(line_no, idx, reason)
        self.report.failed += 1

    def flush(self) -> None:
        with self._writing(self._rows.partial):
            self._rows.flush()

    def commit(self) -> None:
        with self._writing(self._rows.path):
            self._errors.close()
            self._rows.commit()
        self.report.errors_path = str(self._errors.path) if self.report.failed else None

    def discard(self) -> None:
        self._rows.discard()
        self._errors.close()

    def __exit__(self, *exc_info) -> None:
        try:
            self._rows.__exit__(*exc_info)
            self._errors.close()
        except OSError:
            pass  # the error that stopped the job was reported; a second one on close adds nothing
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock_path.unlink(missing_ok=True)  # while held: nobody waits on this inode
            self._lock.close()
            self._lock = None

    @contextlib.contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            raise OutputError(f"cannot write {path}: {err.strerror or err}; the rows finished before "
                              f"this are kept in {self._rows.partial}") from None


def _acquire(lock_path: Path, outputs: str):
    """An open, exclusively flocked lock file; OutputError when another job holds it."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: one writer per output is the user's care
        return None
    handle = open(lock_path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OutputError(f"another v2t job is writing {outputs} (it holds {lock_path}); wait for it "
                          "or choose other --outputs") from None
    return handle

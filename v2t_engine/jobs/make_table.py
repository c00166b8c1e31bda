"""`v2t make-table`: videos → an EasyNLP table (idx, frames[, caption]), written atomically, with
every input that fails in the error report. The rows come from video/rows.py, the same rows
`v2t predict --videos` captions."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ConfigError, RowError
from ..inputs.tables import FRAMES_COLUMN, TableRow
from ..inputs.writer import TableOutput, TableReport
from ..video.decode import FrameOptions
from ..video.rows import VideoRows

log = logging.getLogger(__name__)


@dataclass
class MakeTableReport(TableReport):
    videos_ok: int = 0

    def summary(self) -> str:
        return f"wrote {self.written} rows for {self.videos_ok} videos into {self.outputs}"


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """``idx \\t caption`` lines (an idx may repeat: one table row per caption)."""
    captions: dict[str, list[str]] = {}
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or not fields[1].strip():
                raise ConfigError(f"captions file {str(path)!r} line {line_no}: expected idx TAB caption")
            captions.setdefault(fields[0], []).append(fields[1].strip())
    return captions


def captions_for(idx: str, captions: dict[str, list[str]]) -> list[str] | None:
    """An input's captions, found under its idx or its idx without the extension ("a/b.mp4" →
    "a/b"), so a captions file keyed by video names without extensions matches."""
    return captions.get(idx) or captions.get(str(PurePosixPath(idx).with_suffix("")))


def make_table(spec: str, outputs: str, opts: FrameOptions, captions_path: str | None = None,
               workers: int = 2, idx_style: str = "path", progress: Callable | None = None) -> MakeTableReport:
    """Write an EasyNLP table (idx, frames[, text]) for every input of `spec` to `outputs`
    (atomically: OUTPUTS.partial, renamed when done) and every failure to OUTPUTS.errors.tsv."""
    captions = read_captions(captions_path) if captions_path else None
    rows = VideoRows(spec, opts, workers=workers, idx_style=idx_style)
    report = MakeTableReport(outputs=outputs)
    with TableOutput(report) as out:
        for row in rows:
            texts = [None]
            if isinstance(row, TableRow) and captions is not None:
                texts = captions_for(row.idx, captions)
                if not texts:
                    row = RowError(row.line_no, row.idx, f"no caption for it in {captions_path}")
            if isinstance(row, RowError):
                log.error("skipping %s", row)
                out.add_error(row.line_no, row.idx, row.reason)
            else:
                for text in texts:
                    out.write_row([row.idx, row.fields[FRAMES_COLUMN], *([text] if text is not None else [])])
                report.videos_ok += 1
            if progress is not None:
                progress(1)
        out.commit()
    return report

"""``OUTPUTS.job.json``: what a predict job is, and how far it has durably got.

A job is the same job when its inputs (paths, sizes, modification times), its model (the
export's manifest, which holds every file's SHA-256) and every option that changes the output
are the same; `--resume` refuses anything else and names what changed.

Progress is recorded only after the output and error files have been fsynced: it names the
first input row not yet accounted for and the byte length of both files at that point. A
resumed job cuts both files back to those lengths (dropping a torn last line and anything not
yet durable), seeks to that row and appends; rows written after the last record are captioned
again, never lost or duplicated. The record itself is replaced atomically (write, fsync, rename,
fsync the directory), so a crash leaves the old record or the new one, never a torn one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, OutputError
from ..inputs.table_ranges import TablePosition

SUFFIX = ".job.json"
_FORMAT = 1


def record_path(outputs: str | Path) -> Path:
    return Path(outputs).with_name(Path(outputs).name + SUFFIX)


@dataclass(frozen=True)
class Progress:
    next: TablePosition  # the first input row not yet written or reported
    written: int = 0  # rows in the output up to there
    failed: int = 0  # rows in the error report up to there
    rows_bytes: int = 0  # bytes of OUTPUTS.partial up to there
    errors_bytes: int = 0  # bytes of OUTPUTS.errors.tsv up to there (0: no report yet)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "next": self.next.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> "Progress":
        return cls(TablePosition.from_json(data["next"]),
                   *(int(data[k]) for k in ("written", "failed", "rows_bytes", "errors_bytes")))


@dataclass
class JobRecord:
    identity: dict  # {"inputs": [...], "model": ..., "options": {...}}
    progress: Progress
    complete: bool = False
    stop: TablePosition | None = None  # a shard's end (exclusive); None: the inputs' end

    def save(self, outputs: str | Path) -> None:
        path = record_path(outputs)
        data = {"format": _FORMAT, "identity": self.identity, "progress": self.progress.to_json(),
                "complete": self.complete, "stop": self.stop.to_json() if self.stop else None}
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as err:
            raise OutputError(f"cannot write {path}: {err.strerror or err}") from None

    @classmethod
    def load(cls, outputs: str | Path) -> "JobRecord":
        path = record_path(outputs)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != _FORMAT:
                raise ConfigError(f"{path} was written by another version of v2t (format "
                                  f"{data.get('format')!r}); start over with --overwrite")
            stop = TablePosition.from_json(data["stop"]) if data.get("stop") else None
            return cls(data["identity"], Progress.from_json(data["progress"]), bool(data["complete"]), stop)
        except FileNotFoundError:
            raise ConfigError(f"nothing to resume: {path} does not exist (the job never wrote "
                              "progress, or it finished)") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path} is unreadable ({err}); start over with --overwrite") from None

    def check_same_job(self, identity: dict) -> None:
        """ConfigError naming the first setting that differs from the recorded job."""
        for name, was, now in _differences(self.identity, identity):
            raise ConfigError(f"--resume refused: {name} changed since the job started (was {was}, "
                              f"now {now}); use --overwrite to start over")


def job_identity(tables: list[str], model_dir: str | Path, options: dict) -> dict:
    """What makes two runs the same job (see the module doc)."""
    inputs = []
    for table in tables:
        st = os.stat(table)
        inputs.append({"path": os.path.abspath(table), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"inputs": inputs, "model": model_fingerprint(model_dir),
            "options": json.loads(json.dumps(options, default=str))}


def model_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 of an export's manifest (which holds each file's SHA-256); for a training
    checkpoint directory, of its files' names, sizes and modification times."""
    model_dir = Path(model_dir)
    manifest = model_dir / "manifest.json"
    if manifest.is_file():
        return "manifest sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    listing = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir() if p.is_file())
    return "files sha256:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _differences(was: dict, now: dict, prefix: str = ""):
    for key in sorted(set(was) | set(now)):
        a, b = was.get(key), now.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _differences(a, b, name + ".")
        elif key == "inputs" and a != b:
            yield _input_change(a or [], b or [])
        elif a != b:
            yield ("the model" if key == "model" else f"option {name.removeprefix('options.')}"), a, b


def _input_change(was: list[dict], now: list[dict]) -> tuple[str, object, object]:
    if [t["path"] for t in was] != [t["path"] for t in now]:
        return "the input tables", [t["path"] for t in was], [t["path"] for t in now]
    for a, b in zip(was, now):
        if a != b:
            return (f"input table {a['path']}", f"{a['size']} bytes, mtime {a['mtime_ns']}",
                    f"{b['size']} bytes, mtime {b['mtime_ns']}")
    return "the input tables", was, now


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # a platform without directory fds: the rename is as durable as it gets
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

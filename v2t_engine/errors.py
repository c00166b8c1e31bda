"""Domain exceptions. The CLI turns them into clean messages; nothing else catches them broadly."""
from __future__ import annotations


class V2TError(Exception):
    """Base class of every error v2t raises on purpose."""


class ConfigError(V2TError):
    """A flag, parameter or configuration value is wrong or inconsistent."""


class TableError(V2TError):
    """A whole table cannot be read (missing file, bad schema)."""


class RowError(V2TError):
    """One table row cannot be used. Carries where it is, so reports can name it."""

    def __init__(self, line_no: int, idx: str | None, reason: str):
        self.line_no = line_no
        self.idx = idx
        self.reason = reason
        where = f"line {line_no}" + (f" (idx {idx!r})" if idx is not None else "")
        super().__init__(f"{where}: {reason}")


class FrameError(V2TError):
    """A frames field or one frame in it is unusable; the caller wraps it into a RowError."""


class ArtifactError(V2TError):
    """A checkpoint or export directory is missing files or is inconsistent."""


class ExportValidationError(V2TError):
    """An exported graph disagrees with the PyTorch model beyond tolerance."""


class MissingDependencyError(V2TError, ImportError):
    """An optional part of v2t is not installed; the message names the ``pip install`` that
    fixes it. Also an ImportError, for callers that treat it as one."""


def import_optional(module: str, needed_for: str, install: str):
    """``import module``, or MissingDependencyError: '<needed_for> needs <module>, which is not
    installed: <install>'."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(f"{needed_for} needs {err.name or module}, which is not "
                                     f"installed: {install}") from None


class OutputError(V2TError):
    """An output file cannot be written (disk full, permissions, another job holds it)."""


class ServiceOverloaded(V2TError):
    """A caption service's request queue is full: try again later (HTTP 429)."""


class ServiceClosed(V2TError):
    """A caption service is shutting down (or failed) and takes no new requests (HTTP 503)."""

"""Backends by name. Each registers itself as an entry point of the ``v2t.backends`` group
(pyproject.toml), so the PyTorch reference backend lives with the training stage and this
package never imports it: it is loaded only when chosen, and only where torch is installed.

A backend class may declare ``devices``, the ``--device`` values it runs on (default: cpu and
cuda), and ``explains_refusals = True`` when its constructor says more precisely than ``loads``
why it cannot run a directory here (TensorRT: which module, GPU or engine is missing)."""
from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from ...errors import ArtifactError, ConfigError, MissingDependencyError
from ..tensorrt import GPU_INSTALL
from .base import Backend

GROUP = "v2t.backends"
# What each backend needs beyond the core install.
_INSTALL = {"torch": "pip install torch==2.13.0 && pip install 'v2t[train]'", "trt": GPU_INSTALL}
# `auto` tries these first, in this order: engines built for this GPU, then the ONNX graphs, then
# the reference. The trt backend claims a directory only where it can run its engines (`accepts`).
_PREFERRED = ("trt", "ort", "torch")
# The devices of a backend that declares none.
_DEVICES = ("cpu", "cuda")


def backend_names() -> list[str]:
    names = {ep.name for ep in entry_points(group=GROUP)}
    return [n for n in _PREFERRED if n in names] + sorted(names - set(_PREFERRED))


def backend_class(name: str) -> type[Backend]:
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in found:
        raise ConfigError(f"unknown backend {name!r}; installed: {', '.join(backend_names())}")
    try:
        return found[name].load()
    except ImportError as err:
        raise MissingDependencyError(
            f"the {name} backend needs {err.name}, which is not installed: "
            f"{_INSTALL.get(name, 'pip install v2t')}") from None


def backend_devices(cls: type[Backend]) -> tuple[str, ...]:
    return tuple(getattr(cls, "devices", _DEVICES))


def load_backend(path: str | Path, backend: str = "auto", device: str = "cpu",
                 threads: int | None = None, verify: bool = False, precision: str | None = None) -> Backend:
    """The backend `backend` over `path`; with ``auto``, the first backend that runs on `device`
    and accepts it (an export directory with engines this machine can run runs on TensorRT with
    --device cuda, any other export directory on ONNX Runtime, a training checkpoint on PyTorch).
    `verify` checks the SHA-256 of every file an export's manifest lists (sizes are always
    checked). `precision`: the compute precision a backend that chooses one at load time should
    use (None: its default)."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a directory (expected an export or a checkpoint)")
    if backend != "auto":
        cls = backend_class(backend)
        if not getattr(cls, "explains_refusals", False):
            if device not in backend_devices(cls):
                raise ConfigError(f"--backend {backend} runs on --device {' or '.join(backend_devices(cls))}, "
                                  f"not {device}")
            if not cls.accepts(path):
                raise ArtifactError(f"--backend {backend} loads {cls.loads}; {path} is not one")
        return cls(path, device=device, threads=threads, verify=verify, precision=precision)
    tried, missing = [], []
    for name in backend_names():
        try:
            cls = backend_class(name)
        except MissingDependencyError as err:
            missing.append(str(err))  # a backend that cannot load here cannot claim the directory
            continue
        if device not in backend_devices(cls):
            continue
        if cls.accepts(path):
            return cls(path, device=device, threads=threads, verify=verify, precision=precision)
        tried.append(cls.loads)
    raise ArtifactError(f"{path} is none of: {'; '.join(tried)}" + "".join(f" ({m})" for m in missing))

"""Captioning as a service: `CaptionService` (the embedding API, torch-free and with no web
dependency) feeds one running CaptionGenerator from many threads or coroutines; `app.py` puts it
behind HTTP (Starlette, the `serve` extra) and `v2t serve` runs that on uvicorn."""
from __future__ import annotations

from .service import CaptionService, ServiceStats

__all__ = ["CaptionService", "ServiceStats"]

"""The HTTP face of CaptionService: a Starlette (ASGI) app, run by `v2t serve` on uvicorn.

    POST /v1/captions   {"frames": [...base64...], "idx": ..., "max_generated_num": ..., ...}
                        → {"captions": [...], "idx": ...}; or {"videos": [{...}, ...]} → {"results": [...]}
    GET  /healthz       liveness: the process answers
    GET  /readyz        readiness: 200 once the model is loaded, 503 while loading or draining
    GET  /metrics       Prometheus text

A request passes these gates in order, each failing it alone: the model is ready (else 503), the
body is within max_body_bytes (413), the JSON and its fields are valid (400), there is room in the
queue (429 with Retry-After), every frame decodes (400 naming the frame), captions arrive within
timeout_s (504). Frames are decoded in a thread pool, never on the event loop or the engine thread.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, FrameError, ServiceClosed, ServiceOverloaded, import_optional
from .metrics import SERVE_INSTALL, ServeMetrics
from .requests import BadRequest, ServeLimits, VideoRequest, parse_body
from .service import CaptionService

log = logging.getLogger(__name__)


class HttpError(Exception):
    def __init__(self, status: int, kind: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.retry_after = status, kind, message, retry_after


@dataclass
class ServeState:
    """What the app holds between requests: the service once loaded, the decode pool, metrics."""
    load: Callable[[], CaptionService]
    limits: ServeLimits = field(default_factory=ServeLimits)
    workers: int = 2
    on_fatal: Callable[[str], None] | None = None  # the model failed to load
    service: CaptionService | None = None
    load_error: str | None = None
    draining: bool = False
    decoding: int = 0  # videos admitted and being decoded (event-loop thread only)
    pool: ThreadPoolExecutor | None = None
    metrics: ServeMetrics | None = None

    def not_ready_reason(self) -> str | None:
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        if self.service is None:
            return "the model is loading"
        if self.draining or not self.service.accepting:
            return "the server is shutting down"
        return None

    def load_service(self) -> None:
        try:
            self.service = self.load()
            log.info("model loaded; ready")
        except Exception as err:  # noqa: BLE001 - reported by /readyz and to the command
            self.load_error = str(err) or type(err).__name__
            log.error("the model failed to load: %s", self.load_error)
            if self.on_fatal is not None:
                self.on_fatal(self.load_error)

    def shutdown(self, loader: threading.Thread) -> None:
        """Finish what was taken (the HTTP server has stopped taking requests), then stop."""
        self.draining = True
        loader.join()
        if self.service is not None:
            stats = self.service.stats()
            log.info("draining: %d queued and %d running requests", stats.queued, stats.running)
            self.service.close(drain=True, timeout=self.limits.timeout_s)
        self.pool.shutdown(wait=True, cancel_futures=True)


def create_app(state: ServeState):
    """The Starlette app over `state` (its lifespan loads the model in the background)."""
    import_optional("starlette", "v2t serve", SERVE_INSTALL)
    from starlette.applications import Starlette
    from starlette.routing import Route

    state.metrics = ServeMetrics(lambda: state.service.stats() if state.service is not None else None)

    @asynccontextmanager
    async def lifespan(app):
        state.pool = ThreadPoolExecutor(state.workers, thread_name_prefix="v2t-decode")
        loader = threading.Thread(target=state.load_service, name="v2t-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.shutdown, loader)

    async def captions(request):
        return await _captions(request, state)

    async def healthz(request):
        alive = state.service is None or state.draining or state.service.accepting
        return _json({"status": "ok" if alive else "engine stopped"}, 200 if alive else 500)

    async def readyz(request):
        reason = state.not_ready_reason()
        return _json({"ready": reason is None, **({"reason": reason} if reason else {})},
                     200 if reason is None else 503)

    async def metrics(request):
        from starlette.responses import Response

        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    routes = [Route("/v1/captions", captions, methods=["POST"]), Route("/healthz", healthz),
              Route("/readyz", readyz), Route("/metrics", metrics)]
    return Starlette(routes=routes, lifespan=lifespan)


def _json(payload: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(payload, status_code=status, headers=headers)


async def _captions(request, state: ServeState):
    start = time.perf_counter()
    m = state.metrics
    m.in_progress.inc()
    try:
        payload = await _caption_payload(request, state, start + state.limits.timeout_s)
        m.latency.observe(time.perf_counter() - start)
        status, response = 200, _json(payload)
    except HttpError as err:
        m.errors.labels(err.kind).inc()
        headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
        status, response = err.status, _json({"error": err.message}, err.status, headers)
    except Exception as err:  # noqa: BLE001 - one request's failure must not take the server down
        log.exception("caption request failed")
        m.errors.labels("internal").inc()
        status, response = 500, _json({"error": f"internal error ({type(err).__name__}: {err})"}, 500)
    finally:
        m.in_progress.dec()
    m.requests.labels(str(status)).inc()
    return response


async def _caption_payload(request, state: ServeState, deadline: float) -> dict:
    reason = state.not_ready_reason()
    if reason is not None:
        raise HttpError(503, "unavailable", reason, state.limits.retry_after_s)
    service = state.service
    body = await _read_body(request, state.limits.max_body_bytes)
    try:
        videos, batch = parse_body(body, state.limits)
    except BadRequest as err:
        raise HttpError(400, "bad_request", str(err)) from None
    pixels = await _decode(state, service, videos, batch)
    captions = await _caption_all(state, service, pixels, videos, deadline)
    results = [{"captions": c, **({"idx": v.idx} if v.idx is not None else {})} for c, v in zip(captions, videos)]
    return {"results": results} if batch else results[0]


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HttpError(400, "bad_request", f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise HttpError(413, "too_large", f"body of {declared} bytes is over the limit of {limit} (max_body_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, "too_large", f"body is over the limit of {limit} bytes (max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _decode(state: ServeState, service: CaptionService, videos: list[VideoRequest],
                  batch: bool) -> list[np.ndarray]:
    """Admit the videos (queue room counts those being decoded), then decode them in the pool."""
    n = len(videos)
    if n > service.max_queue:
        raise HttpError(400, "bad_request", f"{n} videos in one request, more than the queue holds ({service.max_queue})")
    if state.decoding + service.stats().queued + n > service.max_queue:
        raise HttpError(429, "overloaded", f"the request queue is full ({service.max_queue} waiting)",
                        state.limits.retry_after_s)
    state.decoding += n
    try:
        loop = asyncio.get_running_loop()
        source = state.limits.frame_source()
        results = await asyncio.gather(*(loop.run_in_executor(state.pool, service.decode_frames, v.frames, source)
                                         for v in videos), return_exceptions=True)
    finally:
        state.decoding -= n
    for i, result in enumerate(results):
        if isinstance(result, FrameError):
            raise HttpError(400, "bad_frames", (f"videos[{i}]: " if batch else "") + str(result))
        if isinstance(result, BaseException):
            raise result
    return results


async def _caption_all(state: ServeState, service: CaptionService, pixels: list[np.ndarray],
                       videos: list[VideoRequest], deadline: float) -> list[list[str]]:
    futures = []
    try:
        for p, v in zip(pixels, videos):
            futures.append(service.submit(p, v.opts))
    except (ServiceOverloaded, ServiceClosed, ConfigError) as err:
        for f in futures:
            f.cancel()
        if isinstance(err, ConfigError):
            raise HttpError(400, "bad_request", str(err)) from None
        overloaded = isinstance(err, ServiceOverloaded)
        raise HttpError(429 if overloaded else 503, "overloaded" if overloaded else "unavailable", str(err),
                        state.limits.retry_after_s) from None
    waiting = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    try:
        return await asyncio.wait_for(waiting, max(deadline - time.perf_counter(), 0.001))
    except asyncio.TimeoutError:
        for f in futures:
            f.cancel()  # withdraws those still queued
        raise HttpError(504, "timeout", f"no captions within {state.limits.timeout_s:g} s (timeout_s)") from None

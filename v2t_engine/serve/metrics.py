"""Prometheus metrics of `v2t serve`, in a registry of their own (not the process-wide default).

HTTP-side figures (requests by status code, errors by kind, latency, requests in progress) are
counted by the app as it answers; the engine's figures (queue depth, batch occupancy, decoder
steps) are read from `CaptionService.stats()` when /metrics is scraped, so the engine thread
never calls into the metrics library.
"""
from __future__ import annotations

from collections.abc import Callable

from ..errors import import_optional
from .service import ServiceStats

SERVE_INSTALL = "pip install 'v2t[serve]'"
# The kinds of refused or failed requests: a label value each, present (at 0) from the start.
ERROR_KINDS = ("bad_request", "bad_frames", "too_large", "overloaded", "unavailable", "timeout", "internal")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    def __init__(self, stats: Callable[[], ServiceStats | None]):
        prom = import_optional("prometheus_client", "v2t serve", SERVE_INSTALL)
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("v2t_requests", "Caption requests answered, by HTTP status code",
                                     ["code"], registry=self.registry)
        self.errors = prom.Counter("v2t_request_errors", "Caption requests refused or failed, by kind",
                                   ["kind"], registry=self.registry)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self.latency = prom.Histogram("v2t_request_latency_seconds",
                                      "Time from a caption request's arrival to its answer (answered with 200)",
                                      buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_progress = prom.Gauge("v2t_requests_in_progress", "Caption requests being handled",
                                      registry=self.registry)
        self.registry.register(_EngineCollector(stats))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


class _EngineCollector:
    """The caption engine's counters and gauges, read at scrape time."""

    def __init__(self, stats: Callable[[], ServiceStats | None]):
        self._stats = stats

    def describe(self):
        return []  # computed at collect time; nothing to check at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._stats()
        if s is None:  # the model is still loading
            return
        gauges = {
            "v2t_queue_depth": ("Requests waiting for a decoder slot", s.queued),
            "v2t_requests_running": ("Requests whose captions are being generated", s.running),
            "v2t_batch_slots": ("Decoder slots of the continuous batch", s.slots),
            "v2t_batch_busy_slots": ("Decoder slots in use at the last step", s.busy_slots),
            "v2t_batch_occupancy": ("Share of the decoder slots in use at the last step", s.busy_slots / s.slots),
        }
        counters = {
            "v2t_decoder_steps": ("Decoder steps run", s.steps),
            "v2t_decoder_busy_slot_steps": ("Slots in use summed over decoder steps (divided by steps "
                                            "and slots: the mean batch occupancy)", s.busy_slot_steps),
            "v2t_prefills": ("Prefill calls (requests entering free slots together)", s.prefills),
            "v2t_videos_completed": ("Videos captioned by the engine", s.completed),
            "v2t_videos_failed": ("Videos the engine failed on (backend errors)", s.failed),
            "v2t_videos_cancelled": ("Queued videos withdrawn by their caller (timeouts)", s.cancelled),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)

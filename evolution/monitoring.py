"""``GET /metrics``: the daemon in the Prometheus text format (``prometheus-client``).

Each app has its own ``CollectorRegistry`` (never the process-global one: tests build many apps,
and two daemons in one process must not share counters). Two kinds of numbers:

- the HTTP layer's, observed as requests pass (``HttpMetrics``, an ASGI middleware): requests
  and latency labelled by the *route template* (``/v1/models/{name}``, never the raw path, so
  ids cannot multiply the series), method and status; completion tokens generated;
- the daemon's, read at each scrape from ``Service.telemetry()`` (``DaemonCollector``): the
  served generation, swaps, karma, captures, age-ups by outcome and their stage durations.

Counters count from the daemon's start (Prometheus' ``rate()`` handles a restart); the ledger
remains the record of every generation ever built.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import Match, Router

__all__ = ["CONTENT_TYPE_LATEST", "DaemonCollector", "HttpMetrics", "Metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Seconds: milliseconds for /health and /karma, up to minutes for a long reply on a busy CPU."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Method labels kept as sent; any other becomes ``other`` (a client cannot add series)."""

UNMATCHED = "(unmatched)"
"""The route label of a request no route took (a 404): one series, whatever the paths asked."""


class DaemonCollector(Collector):
    """The daemon's state as metric families, read from ``telemetry()`` at each scrape."""

    def __init__(self, telemetry: Callable[[], dict]):
        self.telemetry = telemetry

    def collect(self):
        t = self.telemetry()
        served = GaugeMetricFamily("evolution_served_generation", "Generation answering chats (absent while "
                                   "generation 0 is built)")
        if t["served_generation"] is not None:
            served.add_metric([], t["served_generation"])
        yield served
        yield CounterMetricFamily("evolution_model_swaps", "Hot-swaps of the served model (promotions and "
                                  "rollbacks) since the daemon started", value=t["swaps"])
        k = t["karma"]
        yield CounterMetricFamily("evolution_karma_granted", "All karma ever granted (from the ledger)",
                                  value=k["total"])
        yield GaugeMetricFamily("evolution_karma_progress", "Karma counted toward the next age-up",
                                value=k["progress"])
        yield GaugeMetricFamily("evolution_karma_threshold", "Karma the next age-up needs", value=k["threshold"])
        captures = CounterMetricFamily("evolution_captures", "Served chats kept as experiences (written) or "
                                       "that could not be kept (failed), since the daemon started",
                                       labels=["result"])
        for result in ("written", "failed"):
            captures.add_metric([result], t["captures"][result])
        yield captures
        ageups = CounterMetricFamily("evolution_ageups", "Age-ups this daemon ran, by how they ended: promoted "
                                     "(served), rejected by the gate, failed (retried later)", labels=["outcome"])
        for outcome, n in t["ageups"].items():
            ageups.add_metric([outcome], n)
        yield ageups
        r = t.get("retrieval") or {}
        if r.get("pending") is not None:
            yield GaugeMetricFamily("evolution_retrieval_pending", "Lessons in retrieval that no served generation "
                                    "has shown it learned", value=r["pending"])
            yield GaugeMetricFamily("evolution_retrieval_carried", "Lessons a served generation answered right "
                                    "without retrieval (left the index)", value=r["carried"])
        last = (t.get("staleness") or {}).get("last_check") or {}
        if last.get("drift") is not None:
            yield GaugeMetricFamily("evolution_staleness_drift", "Share of the last staleness check's items the served "
                                    "generation answered wrong without retrieval", value=last["drift"])
            yield GaugeMetricFamily("evolution_staleness_items", "Items the last staleness check counted",
                                    value=last["items"])
        counts = r.get("counts") or {}
        for name, what in (("lookups", "Chats whose question was looked up in retrieval"),
                           ("notes", "Lessons put into chat prompts"),
                           ("withheld", "Lessons kept out of prompts because they read as instructions"),
                           ("rebuilds", "Times the retrieval index was written from the ledger")):
            if name in counts:
                yield CounterMetricFamily(f"evolution_retrieval_{name}", what + " since the daemon started",
                                          value=counts[name])
        yield GaugeMetricFamily("evolution_ageup_running", "1 while an age-up worker runs",
                                value=int(t["ageup_running"]))
        stages = SummaryMetricFamily("evolution_ageup_stage_seconds", "Time in each stage of the age-ups this "
                                     "daemon finished (data, train, merge, weights, gguf_f16, quantize, smoke, gate, "
                                     "finalize)", labels=["stage"])
        for stage, (count, total) in sorted(t["stage_seconds"].items()):
            stages.add_metric([stage], count, total)
        yield stages
        last = GaugeMetricFamily("evolution_ageup_last_stage_seconds", "Time in each stage of the last age-up "
                                 "this daemon finished", labels=["stage"])
        for stage, secs in sorted(t["last_stage_seconds"].items()):
            last.add_metric([stage], secs)
        yield last


class Metrics:
    """One app's registry: the HTTP layer's own metrics plus the daemon's collector."""

    def __init__(self, telemetry: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.requests = Counter("evolution_http_requests", "HTTP requests answered, by route template, method "
                                "and status", ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("evolution_http_request_duration_seconds", "Time from a request's arrival to "
                                 "its last byte sent (a streamed reply: the whole stream), by route template",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("evolution_tokens_generated", "Completion tokens the served model generated (a "
                              "streamed reply: its content chunks, about one per token)", registry=self.registry)
        self.registry.register(DaemonCollector(telemetry))

    def render(self) -> bytes:
        """The text exposition (it reads the daemon's state: call it off the event loop)."""
        return generate_latest(self.registry)


class HttpMetrics:
    """ASGI middleware: count and time every HTTP request by the template of the route that takes it."""

    def __init__(self, app, metrics: Metrics, router: Router):
        self.app, self.metrics, self.router = app, metrics, router

    def route_of(self, scope) -> str:
        for route in self.router.routes:
            path = getattr(route, "path", None)
            if path is None:  # a router included with include_router (the dashboard's): its routes say after routing
                continue
            match, _ = route.matches(scope)
            if match != Match.NONE:  # PARTIAL: the path is known, the method is not (a 405)
                return path
        return UNMATCHED

    @staticmethod
    def routed(scope) -> str | None:
        """The template of the route that took the request, as routing recorded it in the scope."""
        route = scope.get("route")
        return getattr(route, "path_format", None) or getattr(route, "path", None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        route = self.route_of(scope)  # before routing rewrites the scope (a mount's root_path)
        method = scope["method"] if scope["method"] in METHODS else "other"
        status = [500]  # an exception that escapes becomes a 500

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if route == UNMATCHED:
                route = self.routed(scope) or UNMATCHED
            self.metrics.requests.labels(route, method, str(status[0])).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - t0)

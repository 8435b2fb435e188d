"""`GET /metrics`: the gateway's own series in Prometheus' text format (prometheus_client). Requests are
counted by route template (never by id) and status; streams and sockets count until they end. Queue and
worker series come from the workers (their own /metrics)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # one per app: two gateways in one process keep apart
        self.requests = Counter(
            "inferq_gateway_requests", "HTTP requests answered, by route and status", ["route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.seconds = Histogram(
            "inferq_gateway_request_duration_seconds", "time from request to the end of its answer (a stream's end)",
            ["route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )  # fmt: skip
        self.in_progress = Gauge(
            "inferq_gateway_requests_in_progress", "requests (streams, sockets) being answered now", ["route"],
            registry=self.registry,
        )  # fmt: skip

    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        @web.middleware
        async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
            route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
            started, status = time.perf_counter(), 500
            self.in_progress.labels(route).inc()
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                self.in_progress.labels(route).dec()
                self.requests.labels(route, str(status)).inc()
                self.seconds.labels(route).observe(time.perf_counter() - started)

        return measure

    async def serve(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

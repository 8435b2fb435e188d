"""A worker's own small HTTP server on `--metrics-port` (INFERQ_METRICS_PORT): what Prometheus, a load balancer
and an orchestrator ask of it (docs/METRICS.md).

- `GET /metrics`: vLLM's `vllm:*` series as `vllm serve` shows them (prometheus_client's default registry, with
  the process and Python collectors) and the worker's `inferq_*` series, queue numbers read from Redis then.
- `GET /ready`: 200 once the engine has loaded and the worker reads its queue, while Redis answers; 503 with
  the reason before that, while draining, and when Redis does not answer. Compose's healthcheck asks it.
- `GET /health`: 200 while the process serves at all (liveness: the engine may still be loading).

It starts before the engine loads (minutes for a large model), so an orchestrator sees a live, unready worker.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from inferq.shared.errors import ConfigError
from inferq.shared.lifecycle import AsyncLifecycle
from inferq.worker.consumer import Worker
from inferq.worker.metrics import WorkerMetrics

log = logging.getLogger("inferq.worker")
_PING_TIMEOUT_S = 1.0
_QUEUE_READ_TIMEOUT_S = 2.0


class Probe(AsyncLifecycle):
    """`async with Probe(host, port, redis, metrics) as probe:`; the worker's run sets `probe.state` and
    `probe.worker`."""

    def __init__(self, host: str, port: int, redis: Redis, metrics: WorkerMetrics) -> None:
        self.host, self.port = host, port
        self.redis = redis
        self.metrics = metrics
        self.state = "loading the engine"  # "ready" once the worker reads; any other text is why it is not
        self.worker: Worker | None = None  # set once it runs: a worker whose engine failed is not ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            await self.close()
            raise ConfigError(
                f"cannot serve metrics on {self.host}:{self.port} ({exc.strerror or exc}): give another "
                "--metrics-port (INFERQ_METRICS_PORT), one per worker on a machine"
            ) from None
        log.info("metrics on http://%s:%d/metrics, readiness on /ready", self.host, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(self.metrics.queue.refresh(self.redis), _QUEUE_READ_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError, ValueError) as exc:  # the last numbers read; the engine's are live
            log.warning("metrics: could not read the queue from Redis (%s)", exc)
        body = generate_latest(REGISTRY) + generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _ready(self, _: web.Request) -> web.Response:
        if self.worker is not None and self.worker.fatal is not None:
            self.state = "the engine failed; the worker is leaving its work to others"
        if self.state != "ready":
            return web.Response(status=503, text=f"not ready: {self.state}\n")
        try:
            await asyncio.wait_for(self.redis.ping(), _PING_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError) as exc:
            return web.Response(status=503, text=f"not ready: Redis does not answer ({type(exc).__name__})\n")
        return web.Response(text="ready\n")

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

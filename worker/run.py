"""Running a worker process: engine up, worker up, signals, drain, exit code. A worker's signal handling lives
here only (shared.aio.run makes SIGTERM act as Ctrl-C for the other commands; a worker opts out of that)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from inferq.shared.aio import cancel_and_wait
from inferq.shared.connection import open_redis
from inferq.shared.errors import ConfigError
from inferq.shared.heap import settle_heap
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings
from inferq.worker.consumer import Worker
from inferq.worker.engine import Engine
from inferq.worker.metrics import WorkerMetrics

if TYPE_CHECKING:
    from inferq.worker.probe import Probe

log = logging.getLogger("inferq.worker")
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def make_engine(kind: str, model_path: str, settings: Settings) -> Engine:
    if kind == "standin":
        from inferq.worker.standin import StandInEngine

        return StandInEngine(settings.standin_step_ms / 1000)
    from inferq.worker.vllm_engine import VllmEngine

    return VllmEngine(model_path, settings)


Alongside = Callable[[], AbstractAsyncContextManager[Any]]


async def serve(
    settings: Settings,
    engine: Engine,
    *,
    model: str,
    consumer: str | None = None,
    alongside: Alongside | None = None,
) -> int:
    """Run until SIGTERM/SIGINT. First signal: stop reading and drain (up to drain_timeout_s), exit 0.
    Second signal: abort in-flight work, leaving it pending for other workers. Dead engine: exit 1.
    `alongside` (the detached bulk-job runner) runs while the worker reads and stops at the first signal.
    With INFERQ_METRICS_PORT, /metrics and /ready are served from before the engine loads until the end."""
    redis = await open_redis(settings, wait=log)  # a cluster's node too: it asks the server which it is
    metrics = WorkerMetrics(Keys.of(settings), model)
    probe = None
    if settings.metrics_port:
        try:
            from inferq.worker.probe import Probe
        except ImportError as missing:  # aiohttp comes with the engine extras (vLLM serves HTTP with it too)
            if missing.name != "aiohttp":
                raise
            raise ConfigError("--metrics-port needs aiohttp: pip install 'inferq[gpu]' (or [cpu])") from None

        probe = Probe(settings.metrics_host, settings.metrics_port, redis, metrics)
    try:
        async with probe or contextlib.nullcontext():
            return await _serve(settings, engine, redis, metrics, probe, model, consumer, alongside)
    finally:
        await redis.aclose()


class _Signals:
    """The worker's SIGTERM and SIGINT, from before the engine loads until it has stopped. While the engine loads,
    the first stops the worker at once (nothing runs yet that could drain). Once the worker runs, the first stops
    its reading and it drains; the second leaves what still runs pending for other workers."""

    def __init__(self, probe: Probe | None) -> None:
        self.probe = probe
        self.first: asyncio.Future[int] = asyncio.get_running_loop().create_future()  # its number, once it came
        self.hard_stop = asyncio.Event()
        self.worker: Worker | None = None
        self._count = 0

    def __enter__(self) -> _Signals:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)

    def serving(self, worker: Worker) -> None:
        """The worker runs from now: a signal that came before it did stops its reading at once."""
        self.worker = worker
        if self.first.done():
            self._stop_reading(worker, self.first.result())

    def _on_signal(self, signum: int) -> None:
        self._count += 1
        if self._count == 1:
            self.first.set_result(signum)
            if self.worker is not None:
                self._stop_reading(self.worker, signum)
        elif self.worker is not None:
            log.warning("second signal: leaving in-flight requests pending for other workers")
            self.hard_stop.set()

    def _stop_reading(self, worker: Worker, signum: int) -> None:
        name = signal.Signals(signum).name
        log.info("%s: no new work; finishing in-flight requests (signal again to stop now)", name)
        worker.stop_reading()
        if self.probe is not None:
            self.probe.state = "draining: no new work"


async def _serve(
    settings: Settings,
    engine: Engine,
    redis: Redis,
    metrics: WorkerMetrics,
    probe: Probe | None,
    model: str,
    consumer: str | None,
    alongside: Alongside | None,
) -> int:
    with _Signals(probe) as signals:
        try:
            if (code := await _start_engine(engine, signals.first)) is not None:
                return code
            settle_heap("startup")  # before the worker says it is ready: the collection stops everything a moment
            async with Worker(settings, engine, redis, model=model, consumer=consumer, metrics=metrics) as worker:
                if probe is not None:
                    probe.state, probe.worker = "ready", worker
                signals.serving(worker)
                async with alongside() if alongside else contextlib.nullcontext():
                    await worker.run()
                drain = asyncio.create_task(worker.drain(0 if worker.fatal else settings.drain_timeout_s))
                stop = asyncio.create_task(signals.hard_stop.wait())
                await asyncio.wait({drain, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not drain.done():
                    drain.cancel()
                    await worker.abandon()
            return 1 if worker.fatal else 0
        finally:
            if probe is not None:
                probe.state = "stopping"
            await engine.stop()


async def _start_engine(engine: Engine, signalled: asyncio.Future[int]) -> int | None:
    """Start the engine (minutes for a large model; it loads off the event loop, so the probe answers). None once
    it has started. A signal meanwhile (`signalled`) cancels the start, which stops the engine processes started
    so far, and gives the signal's exit code (128 + its number)."""
    starting = asyncio.create_task(engine.start())
    try:
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        starting.cancel()
        raise
    if starting.done():  # started (a signal that came with it is the worker's first: it drains at once)
        await starting  # its error, if it failed
        return None
    signum = signalled.result()
    log.warning("%s while the engine loads: stopping now (nothing runs yet)", signal.Signals(signum).name)
    await cancel_and_wait(starting)
    return 128 + signum


async def run_until_signalled(service: Alongside) -> int:
    """Run `service` (an async context manager that works in the background) until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with service():
            await stop.wait()
            log.info("signal: stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0

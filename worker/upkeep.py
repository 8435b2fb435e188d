"""What a worker does beside reading and running: renew its claims several times per claim window, beat once
per heartbeat (with its rates and its engine's load), reap dead consumers, look at cancels, and watch its
engine for a stall (docs/CONTRACTS.md, "Delivery", "Cancellation and deadlines", "Watchdog").

`Upkeep` is a part of `Worker` (worker/consumer.py), kept in a module of its own: it works on the worker's
state, declared here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from redis.asyncio import Redis

from inferq.shared.connection import pipeline
from inferq.shared.errors import EngineError
from inferq.shared.keys import Keys
from inferq.shared.registry import register
from inferq.shared.settings import Settings
from inferq.worker.claims import Claims
from inferq.worker.engine import Engine
from inferq.worker.flow import SlotControl
from inferq.worker.jobs import Job
from inferq.worker.metrics import WorkerMetrics

log = logging.getLogger("inferq.worker")


class Upkeep:
    settings: Settings
    engine: Engine
    redis: Redis
    keys: Keys
    model: str
    name: str
    capacity: int
    flow: SlotControl
    metrics: WorkerMetrics
    claims: Claims
    fatal: BaseException | None
    tokens_out: int
    completed: int
    _jobs: dict[tuple[str, str], Job]
    _by_request: dict[str, Job]
    _checks: set[asyncio.Task[None]]
    _slot_free: asyncio.Event
    _progress_at: float

    def interrupt(self, request_id: str, reason: str, error: str | None = None) -> None:
        raise NotImplementedError  # Worker's

    def stop_reading(self) -> None:
        raise NotImplementedError  # Worker's

    def _on_cancel(self, data: bytes) -> None:
        """A cancel broadcast names a request; its result's `cancel` mark (set by cancel.lua, by whoever may
        write that result) decides. Anyone who may publish to the channel can name any id."""
        request_id = data.decode(errors="replace")
        if request_id in self._by_request:
            task = asyncio.create_task(self._check_cancel(request_id), name="inferq-cancel")
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    async def _maintain(self) -> None:
        """Renew claims several times per claim window; beat, poll cancels and reap once per heartbeat."""
        last_tokens, last_completed, last_beat = self.tokens_out, self.completed, time.monotonic()
        while True:
            await asyncio.sleep(self.claims.renew_interval_s)
            if self._engine_stalled():
                return  # no more renewals: other workers take this worker's entries over
            try:
                for stream, entry_id in await self.claims.renew(self._owned()):
                    self._lose(stream, entry_id)
                now = time.monotonic()
                if now - last_beat < self.settings.heartbeat_s:
                    continue
                span = max(now - last_beat, 1e-6)
                rates = ((self.tokens_out - last_tokens) / span, (self.completed - last_completed) / span)
                last_tokens, last_completed, last_beat = self.tokens_out, self.completed, now
                if self.flow.update(self.engine.load(), len(self._jobs)):
                    log.info("engine load: now taking up to %d requests (of %d)", self.flow.slots, self.capacity)
                    self._slot_free.set()
                await self._beat(*rates)
                await self._poll_cancels()
                for name in await self.claims.reap():
                    log.info("removed dead consumer %s from the group", name)
            except Exception as exc:  # a missed beat is not fatal; the next one retries
                log.warning("heartbeat failed: %s", exc)

    def _engine_stalled(self) -> bool:
        """True (and the worker stops, exit 1) once requests have been running with no output from the engine
        for engine_stall_s: a hung engine must not hold its entries by renewing their claims forever."""
        now = time.monotonic()
        if not any(job.interruptible for job in self._jobs.values()):
            self._progress_at = now  # idle is not a stall
            return False
        if now - self._progress_at < self.settings.engine_stall_s:
            return False
        if self.fatal is None:
            self.fatal = EngineError(
                f"the engine produced nothing for {now - self._progress_at:.0f} s with requests running "
                "(INFERQ_ENGINE_STALL_S); leaving them to other workers"
            )
            log.error("ENGINE STALLED: worker %s stops: %s", self.name, self.fatal)
            self.stop_reading()
        return True

    def _owned(self) -> dict[str, list[str]]:
        owned: dict[str, list[str]] = {}
        for job in self._jobs.values():
            owned.setdefault(job.stream, []).append(job.entry_id)
        return owned

    def _lose(self, stream: str, entry_id: str) -> None:
        """Another worker took this entry over (we could not renew in time): stop running it, write nothing."""
        job = self._jobs.get((stream, entry_id))
        if job is not None and job.task is not None and job.interruptible:
            log.warning("entry %s was taken over by another worker; dropping our run of it", entry_id)
            self.metrics.of(stream).lost.inc()
            job.task.cancel()

    async def _check_cancel(self, request_id: str) -> None:
        try:
            await self._poll_cancels([request_id])
        except Exception as exc:  # Redis away: the next heartbeat's poll looks again
            log.warning("could not check the cancel of %s (%s); the next heartbeat looks again", request_id, exc)

    async def _poll_cancels(self, request_ids: list[str] | None = None) -> None:
        """Interrupt the requests (by default every one running here) whose result carries a cancel mark.
        Once per beat too: cancels broadcast while our subscription was down are still marked on the result."""
        running = request_ids or [job.request.id for job in self._jobs.values() if job.request is not None]
        if not running:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in running:
                pipe.hget(self.keys.result(request_id), "cancel")
            marks = await pipe.execute()
        for request_id, mark in zip(running, marks, strict=True):
            if mark == b"1":
                self.interrupt(request_id, "cancelled")

    async def _beat(self, tokens_per_s: float = 0.0, completions_per_s: float = 0.0) -> None:
        key = self.keys.worker(self.name)
        async with pipeline(self.redis, atomic=True) as pipe:
            pipe.hset(key, mapping={
                "name": self.name, "model": self.model, "engine": self.engine.name, "capacity": self.capacity,
                "slots": self.flow.slots, "inflight": len(self._jobs), "tokens_per_s": f"{tokens_per_s:.1f}",
                "completions_per_s": f"{completions_per_s:.2f}", "completed": self.completed,
                "last_seen": repr(time.time()), "pid": os.getpid(), "host": socket.gethostname(),
            })  # fmt: skip
            ttl = max(3, int(self.settings.heartbeat_s * 3))
            pipe.expire(key, ttl)
            register(pipe, self.keys, self.settings, self.model, worker=(self.name, ttl))
            await pipe.execute()

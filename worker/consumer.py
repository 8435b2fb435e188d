"""The consumer-group worker: read as many entries as there are free slots, run them on the engine,
stream their tokens, and finish each with one transaction (result + ack + delete) (DESIGN.md "Delivery")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.codec import pack, unpack
from shared.errors import BadPayload, EngineError
from shared.keys import GROUP, Keys
from shared.lifecycle import AsyncLifecycle
from shared.schemas import SCHEMA_VERSION, GenerationRequest
from shared.settings import Settings
from worker.engine import Engine, RequestRejected
from worker.outbox import Command, Outbox

log = logging.getLogger("inferq.worker")

_READ_LUA = resources.files("worker").joinpath("read_lanes.lua").read_text()
_BLOCK_MS = 1000  # longest a blocked read delays noticing a stop request


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Worker(AsyncLifecycle):
    """`async with Worker(...) as w: await w.run()`; `stop_reading()` then `drain()` for a clean stop."""

    def __init__(
        self, settings: Settings, engine: Engine, redis: Redis, *, model: str, consumer: str | None = None
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.model = model
        self.name = consumer or default_consumer_name()
        self.keys = Keys(settings.key_prefix)
        self.streams = self.keys.queues(model)
        self.capacity = settings.max_inflight
        self.outbox = Outbox(redis)
        self._read_script = redis.register_script(_READ_LUA)
        self._tasks: dict[str, asyncio.Task[None]] = {}  # entry id -> task running it
        self._entry_stream: dict[str, str] = {}
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None
        self.fatal: BaseException | None = None
        self.tokens_out = 0
        self.completed = 0

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        for stream in self.streams:
            try:  # from 0: entries added before the first worker started are read too
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self.outbox.start()
        await self._beat()  # the heartbeat key doubles as "ready": the engine is up, reading starts now
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="inferq-heartbeat")
        log.info(
            "worker %s ready: model %s, %d slots, engine %s", self.name, self.model, self.capacity, self.engine.name
        )

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await self.outbox.stop()
        with contextlib.suppress(Exception):
            await self.redis.delete(self.keys.worker(self.name))

    def stop_reading(self) -> None:
        self._stopping.set()
        self._slot_free.set()

    async def drain(self, timeout_s: float) -> None:
        """Wait for in-flight requests up to `timeout_s`; abort the rest and leave them pending for others."""
        if self._tasks:
            log.info("draining %d in-flight requests (up to %.0fs)", len(self._tasks), timeout_s)
            _, late = await asyncio.wait(set(self._tasks.values()), timeout=timeout_s)
            if late:
                log.warning("drain timeout: leaving %d requests pending for other workers", len(late))
            await self.abandon()

    async def abandon(self) -> None:
        """Abort everything in flight without acknowledging it: other workers will reclaim it."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- reading ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Read and dispatch until stop_reading() (or a dead engine)."""
        while not self._stopping.is_set():
            free = self.capacity - len(self._tasks)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            for stream, entry_id, fields in await self._read(free):
                self._dispatch(stream, entry_id, fields)

    async def _read(self, free: int) -> list[tuple[str, str, dict[bytes, bytes]]]:
        found = await self._read_script(keys=self.streams, args=[GROUP, self.name, free])
        if found:
            return [(self.streams[int(i) - 1], _text(eid), _pairs(f)) for i, eid, f in found]
        # Nothing queued: block until something arrives. Redis answers a blocked multi-stream read with
        # the one stream that received data, so this still takes no more than `free` entries.
        reply = await self.redis.xreadgroup(
            GROUP, self.name, dict.fromkeys(self.streams, ">"), count=free, block=_BLOCK_MS
        )
        return [(_text(s), _text(eid), f) for s, entries in reply or [] for eid, f in entries]

    def _dispatch(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        task = asyncio.create_task(self._process(stream, entry_id, fields), name=f"inferq-{entry_id}")
        self._tasks[entry_id] = task
        self._entry_stream[entry_id] = stream
        task.add_done_callback(lambda _t: self._release(entry_id))

    def _release(self, entry_id: str) -> None:
        self._tasks.pop(entry_id, None)
        self._entry_stream.pop(entry_id, None)
        self._slot_free.set()

    # ---- one request -----------------------------------------------------------------------------
    async def _process(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        raw = fields.get(b"m")
        try:
            if raw is None:
                raise BadPayload("queue entry has no 'm' field")
            request = GenerationRequest.from_payload(unpack(raw))
        except BadPayload as exc:
            log.warning("entry %s on %s is poison: %s", entry_id, stream, exc)
            await self._fail(stream, entry_id, fields, str(exc), request=None)
            return
        try:
            await self._generate(stream, entry_id, request)
        except EngineError as exc:
            # Leave this entry (and every other in-flight one) pending: the engine, not the request, failed.
            if self.fatal is None:
                self.fatal = exc
                log.error("engine failed, worker stops and leaves its work pending: %s", exc)
                self.stop_reading()
        except RequestRejected as exc:
            await self._fail(stream, entry_id, fields, f"rejected by the engine: {exc}", request=request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request %s failed in the engine", request.id)
            await self._fail(stream, entry_id, fields, f"engine error: {exc.__class__.__name__}: {exc}", request)

    async def _generate(self, stream: str, entry_id: str, request: GenerationRequest) -> None:
        rkey = self.keys.result(request.id)
        started = time.time()
        self.outbox.add(
            ("HSET", rkey, "status", "running", "started_at", repr(started), "worker", self.name),
            ("HINCRBY", rkey, "attempts", 1),
        )
        channel = request.reply_channel if request.stream else None
        parts: list[str] = []
        seq = completion_tokens = prompt_tokens = 0
        first_token_at: float | None = None
        finish_reason: str | None = None
        last_text = ""
        async for delta in self.engine.generate(request):
            if first_token_at is None:
                first_token_at = time.time()
            parts.append(delta.text)
            completion_tokens += len(delta.token_ids)
            prompt_tokens = delta.prompt_tokens
            if delta.finished:
                finish_reason, last_text = delta.finish_reason, delta.text
                last_ids = delta.token_ids
                break
            if channel:
                self.outbox.publish(
                    channel, {"id": request.id, "seq": seq, "text": delta.text, "token_ids": delta.token_ids}
                )
                seq += 1
        else:
            last_ids = []
        self.tokens_out += completion_tokens
        record = {
            "status": "done",
            "text": "".join(parts),
            "finish_reason": finish_reason or "stop",
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "first_token_at": repr(first_token_at or time.time()),
            "finished_at": repr(time.time()),
        }
        final_event = {
            "id": request.id,
            "seq": seq if channel else 0,
            "text": last_text if channel else "",
            "token_ids": last_ids if channel else [],
            "finished": True,
            "finish_reason": record["finish_reason"],
            "status": "done",
        }
        await self._finish(stream, entry_id, request, record, final_event)
        self.completed += 1

    async def _finish(
        self,
        stream: str,
        entry_id: str,
        request: GenerationRequest | None,
        record: dict[str, Any],
        final_event: dict[str, Any] | None,
        extra: tuple[Command, ...] = (),
    ) -> None:
        """One transaction: the stored result, the ack + delete, the reply-stream record, the final event."""
        commands: list[Command] = [*extra]
        if request is not None:
            rkey = self.keys.result(request.id)
            commands += [
                ("HSET", rkey, *(x for kv in record.items() for x in (kv[0], str(kv[1])))),
                ("EXPIRE", rkey, self.settings.result_ttl_s),
            ]
            if request.reply_stream:
                durable = {"v": SCHEMA_VERSION, "id": request.id, **record}
                commands.append(("XADD", request.reply_stream, "*", "m", pack(durable)))
        commands += [("XACK", stream, GROUP, entry_id), ("XDEL", stream, entry_id)]
        events = ((request.reply_channel, final_event),) if request and request.reply_channel and final_event else ()
        await self.outbox.add(*commands, events=events)

    async def _fail(
        self, stream: str, entry_id: str, fields: dict[bytes, bytes], error: str, request: GenerationRequest | None
    ) -> None:
        """Poison or rejected input: dead-letter it with the reason, store `failed`, acknowledge it."""
        deliveries = 1
        dead = (
            "XADD", self.keys.dlq(self.model), "*",
            "payload", fields.get(b"m", b""), "error", error, "stream", stream, "entry_id", entry_id,
            "deliveries", deliveries, "failed_at", repr(time.time()), "worker", self.name,
        )  # fmt: skip
        record = {"status": "failed", "error": error, "finish_reason": "error", "finished_at": repr(time.time())}
        # seq -1: the client cannot match it to the token events it saw, so it reads the stored result.
        event = (
            {"id": request.id, "seq": -1, "finished": True, "finish_reason": "error", "status": "failed"}
            if request
            else None
        )
        await self._finish(stream, entry_id, request, record, event, extra=(dead,))

    # ---- heartbeat and claims ----------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        last_tokens, last_t = self.tokens_out, time.monotonic()
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            now = time.monotonic()
            rate = (self.tokens_out - last_tokens) / max(now - last_t, 1e-6)
            last_tokens, last_t = self.tokens_out, now
            try:
                await self._beat(rate)
                await self._renew_claims()
            except Exception as exc:  # a missed beat is not fatal; the next one retries
                log.warning("heartbeat failed: %s", exc)

    async def _beat(self, tokens_per_s: float = 0.0) -> None:
        key = self.keys.worker(self.name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={
                "model": self.model, "engine": self.engine.name, "capacity": self.capacity,
                "inflight": len(self._tasks), "tokens_per_s": f"{tokens_per_s:.1f}", "completed": self.completed,
                "last_seen": repr(time.time()), "pid": os.getpid(), "host": socket.gethostname(),
            })  # fmt: skip
            pipe.expire(key, max(3, int(self.settings.heartbeat_s * 3)))
            await pipe.execute()

    async def _renew_claims(self) -> None:
        """Reset the idle time of every entry this worker is running, so no other worker takes it over."""
        by_stream: dict[str, list[str]] = {}
        for entry_id, stream in list(self._entry_stream.items()):
            by_stream.setdefault(stream, []).append(entry_id)
        if not by_stream:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xclaim(stream, GROUP, self.name, 0, ids, justid=True)
            await pipe.execute()


def _pairs(flat: list[Any]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}

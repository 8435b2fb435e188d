"""The async client: validate, admit atomically, stream tokens back, read stored results."""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, NoReturn

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, RedisError

from inferq.producer.admission import EXISTS, Admission, Admitter
from inferq.producer.ops import stats
from inferq.producer.ops.dead_letters import DeadLetters
from inferq.producer.replies import GAP, TICK, Inbox, ReplyListener, Signal
from inferq.shared.batching import BatchedHashReads
from inferq.shared.codec import pack, text
from inferq.shared.connection import OUTAGE, as_inferq_error, open_redis, redis_errors
from inferq.shared.errors import (
    InvalidRequest,
    RedisUnavailable,
    RequestFailed,
    RequestNotFound,
    RequestTimeout,
)
from inferq.shared.keys import Keys, bulk_request_id
from inferq.shared.lifecycle import AsyncLifecycle
from inferq.shared.limits import check_max_tokens, check_request
from inferq.shared.lua import LuaScript
from inferq.shared.schemas import ChatMessage, GenerationRequest, Result, TokenEvent, describe_validation_error
from inferq.shared.settings import Settings, load_settings

# A waiting call reads the stored result now and then, in case a final event was lost (a reply channel Redis
# refused, a worker that died between its final write and the event on a cluster): result() after 2 s without
# its final event, tokens() after 1 s without an event (each within the listener's TICK_S). Each read that finds
# it still running doubles the wait for the next, up to POLL_MAX_S: a request that waits long in a deep queue
# costs a read or two, not one every few seconds, and a lost event still shows within POLL_MAX_S.
RESULT_POLL_S = 2.0
QUIET_S = 1.0
POLL_MAX_S = 30.0
_AWAY_S = 0.5  # how often result() asks again for a result Redis could not give (unreachable)
CANCEL = LuaScript("inferq.producer", "cancel.lua")
EXPIRE = LuaScript("inferq.producer", "expire.lua")


class RequestHandle:
    """A submitted request: iterate `tokens()` for its events, await `result()` for the stored outcome."""

    def __init__(self, client: InferenceClient, request: GenerationRequest, queue: Inbox) -> None:
        self.client = client
        self.request = request
        self.id = request.id
        self._queue = queue
        self._finished = False  # its final event came
        self._told: Result | None = None  # the stored result, when its final event carried it
        self._next_seq = 0
        self.gap = False  # True once events were missed: tokens() stops early, result() reads the store

    async def tokens(self, timeout: float | None = None) -> AsyncIterator[TokenEvent]:
        """Token events in order (seq 0, 1, ...), ending with the one that has `finished=True`.

        Ends early, without error, if events were missed; `result()` then still has the whole text.
        Raises RequestTimeout if the request has not finished after `timeout` seconds (default:
        settings.request_timeout_s)."""
        if not self.request.stream:
            raise InvalidRequest("this request was submitted with stream=False; await result() instead")
        limit = self._limit(timeout)
        loop = self._queue.loop
        deadline = Signal("DEADLINE")  # this call's own: one a timer of an earlier call left behind is not it
        timer = loop.call_later(limit, self._queue.put_nowait, deadline)
        quiet = QUIET_S
        self._queue.poll_at = loop.time() + quiet
        heard = False  # an event came since the last tick (one read late, behind events, is not silence)
        try:
            while not self._finished:
                item = await self._queue.get()
                if item is deadline:
                    await self._timed_out(limit)
                if item is TICK:
                    if heard:
                        quiet = QUIET_S
                    else:  # nothing since the last tick: a final event may have been lost, so ask the store
                        if await self._stored_if_final() is not None:
                            self.gap = True
                            return
                        quiet = min(2 * quiet, POLL_MAX_S)
                    heard = False
                    self._queue.poll_at = loop.time() + quiet
                    continue
                if isinstance(item, Signal) and item is not GAP:
                    continue  # an earlier call's deadline
                heard = True
                event = self._accept(item)
                if event is None:
                    return
                yield event
        finally:
            timer.cancel()
            self._queue.poll_at = math.inf
            if self._finished:
                self.client._replies.unregister(self.id, self._queue)  # nothing more will come for this id

    async def result(self, timeout: float | None = None) -> Result:
        """Wait for the request to end and return its stored result.

        Raises RequestTimeout after `timeout` seconds (default: settings.request_timeout_s); the request
        itself goes on and can be read later with `client.get(id)`."""
        limit = self._limit(timeout)
        loop = self._queue.loop
        # One timer for the limit (not a timeout scope per wait: this runs per request). The listener's TICK
        # (Inbox.poll_at) paces the reads of the store, should no final event come: after RESULT_POLL_S, then
        # twice as long each time (POLL_MAX_S).
        deadline = Signal("DEADLINE")
        timer = loop.call_later(limit, self._queue.put_nowait, deadline)
        give_up = loop.time() + limit
        poll = RESULT_POLL_S
        read = self.gap  # events were missed already: the store is the truth now
        try:
            while True:
                if self._told is not None:  # its final event said what was stored: no read needed
                    self.client._replies.unregister(self.id, self._queue)
                    return self._told
                if self._finished or read:
                    stored = await self._stored_if_final()
                    if stored is not None:
                        self.client._replies.unregister(self.id, self._queue)
                        return stored
                    if self._finished:  # no event will come now: only the store can answer (Redis is away)
                        if loop.time() >= give_up:
                            await self._timed_out(limit)
                        await asyncio.sleep(_AWAY_S)
                        continue
                    read = False
                if self._queue.poll_at == math.inf:
                    self._queue.poll_at = loop.time() + poll
                    poll = min(2 * poll, POLL_MAX_S)
                item = await self._queue.get()
                if item is deadline:
                    await self._timed_out(limit)
                elif item is TICK:
                    read = True  # nothing final heard for a while: consult the store
                elif (isinstance(item, TokenEvent) or item is GAP) and self._accept(item) is None:
                    read = True  # events were missed: the store is the truth now
        finally:
            timer.cancel()
            self._queue.poll_at = math.inf

    async def cancel(self) -> str:
        """Cancel this request (see InferenceClient.cancel); returns its status after the call."""
        return await self.client.cancel(self.id)

    async def _stored_if_final(self) -> Result | None:
        """The stored result if the request has ended; None while it runs or while Redis is unreachable
        (waiting goes on: a worker's result write is retried until Redis is back)."""
        try:
            stored = await self.client.get(self.id)
        except OUTAGE:
            return None
        return stored if stored.final else None

    def _limit(self, timeout: float | None) -> float:
        return self.client.settings.request_timeout_s if timeout is None else timeout

    async def _timed_out(self, limit: float) -> NoReturn:
        model = self.request.model
        try:
            served = any(w["model"] == model for w in await stats.workers(self.client.redis, self.client.keys))
        except (*OUTAGE, NoPermissionError):
            served = True  # unknown (Redis away, or a role that cannot list workers): say nothing about them
        why = (
            "" if served else f"; no live worker serves model {model!r}: start one with `inferq worker --model {model}`"
        )
        raise RequestTimeout(
            f"request {self.id} did not finish within {limit:g}s{why}; it may still finish: "
            f"check later with `inferq result {self.id}`"
        )

    def _accept(self, item: TokenEvent | Signal) -> TokenEvent | None:
        if not isinstance(item, TokenEvent):  # GAP
            self.gap = True
            return None
        if item.finished:
            self._finished = True
            if item.result is not None:  # what the worker stored, sent with the event: true even after a gap
                self._told = Result.from_fields(self.id, item.result)
        if item.seq != self._next_seq:
            self.gap = True  # a lost message: the stored result is the truth now
            return None
        self._next_seq += 1
        return item


class InferenceClient(AsyncLifecycle):
    """Async client. Use as `async with InferenceClient(settings) as client:` or `await InferenceClient.from_url(url)`.

    On start it subscribes once to its own reply channel; every request names that channel."""

    def __init__(
        self, settings: Settings | None = None, *, redis: Redis | None = None, tenant_caps: dict[str, int] | None = None
    ) -> None:
        """`tenant_caps`: unfinished requests per model that a tenant may have, for tenants whose cap is not
        INFERQ_TENANT_CAP (the gateway's per-key caps)."""
        self.settings = settings or load_settings()
        self._tenant_caps = tenant_caps
        self.keys = Keys.of(self.settings)
        tenant = self.settings.tenant
        self.client_id = uuid.uuid4().hex[:16] if tenant is None else Keys.tenant_scoped(tenant, uuid.uuid4().hex[:16])
        self.channel = self.keys.tokens(self.client_id)
        self._redis = redis
        self._own_redis = redis is None
        self._replies: ReplyListener
        self._admitter: Admitter
        self._reads: BatchedHashReads
        self._started = False

    @classmethod
    async def from_url(cls, url: str | None = None, **settings: Any) -> InferenceClient:
        client = cls(load_settings(redis_url=url, **settings))
        await client.start()
        return client

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("client not started: use `async with InferenceClient(...)` or await start()")
        return self._redis

    @redis_errors("connect")
    async def start(self) -> None:
        if self._started:
            return
        if self._redis is None:
            self._redis = await open_redis(self.settings)
        self._admitter = Admitter(self.redis, self.settings, self._tenant_caps)
        self._admitter.start()
        self._reads = BatchedHashReads(self.redis)
        self._reads.start()
        self._replies = ReplyListener(self.redis, self.channel)
        await self._replies.start()
        self._started = True

    async def close(self) -> None:
        if not self._started:
            return
        await self._admitter.stop()
        await self._reads.stop()
        await self._replies.stop()
        if self._own_redis and self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        self._started = False

    def build_request(self, **params: Any) -> GenerationRequest:
        """Validate a request without sending it (the arguments of build_packed). Raises InvalidRequest with
        what to fix."""
        return self.build_packed(**params)[0]

    def build_packed(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[ChatMessage | dict[str, str]] | None = None,
        model: str | None = None,
        request_id: str | None = None,
        ttl: float | None = None,
        **params: Any,
    ) -> tuple[GenerationRequest, bytes]:
        """Validate a request without sending it, and pack its payload: its size is checked on these bytes, and
        admission sends them as they are (enqueue_many's `packed`), so a request is packed once. Raises
        InvalidRequest with what to fix.

        `ttl` (seconds from now) is a shorthand for `deadline` (unix time): a request not started by then
        ends `expired` without running; one still running then is aborted and ends `expired`."""
        if ttl is not None:
            if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
                raise InvalidRequest(f"ttl={ttl!r} must be a positive number of seconds (how long it may wait and run)")
            if params.get("deadline") is not None:
                raise InvalidRequest("give ttl or deadline, not both")
            params["deadline"] = time.time() + ttl
        stream_job = self.keys.reply_stream_job(params["reply_stream"]) if params.get("reply_stream") else None
        if request_id is None:  # a reply stream takes only its job's requests: give this one such an id
            unique = os.urandom(16).hex()  # as random as uuid4's hex, without making a UUID (this runs per submit)
            request_id = bulk_request_id(stream_job, 0, unique) if stream_job else unique
            if self.settings.tenant is not None and not stream_job:
                request_id = Keys.tenant_scoped(self.settings.tenant, request_id)
        if self.settings.tenant is not None:
            params["tenant"] = self._bound_tenant(request_id, params.get("tenant"))
        check_max_tokens(params.get("max_tokens"), self.settings)  # before the schema's own, wider ceiling
        try:
            request = GenerationRequest(
                id=request_id,
                model=model or self.settings.model,
                prompt=prompt,
                messages=list(messages) if messages is not None else None,  # type: ignore[arg-type]
                **params,
            )
        except ValidationError as exc:
            raise InvalidRequest(f"invalid request: {describe_validation_error(exc)}") from None
        except TypeError as exc:
            raise InvalidRequest(f"invalid request: {exc}") from None
        try:
            packed = pack(request.payload())
        except UnicodeEncodeError:
            raise InvalidRequest(
                "invalid request: its text is not valid Unicode (a lone surrogate such as '\\ud800'?)"
            ) from None
        check_request(request, len(packed), self.settings, self.keys)
        return request, packed

    def _bound_tenant(self, request_id: str, tenant: object) -> str:
        """A tenant-bound client's requests are its tenant's, with ids it may write (INFERQ_TENANT)."""
        bound = str(self.settings.tenant)
        if tenant is not None and tenant != bound:
            raise InvalidRequest(f"tenant={tenant!r}: this client is bound to tenant {bound!r} (INFERQ_TENANT)")
        if not isinstance(request_id, str) or not request_id.startswith(Keys.tenant_scoped(bound, "")):
            raise InvalidRequest(
                f"request_id must start with {Keys.tenant_scoped(bound, '')!r}: this client is bound to tenant "
                f"{bound!r} (INFERQ_TENANT), and may write only its results (bulk jobs run under the ops role)"
            )
        return bound

    async def submit(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[ChatMessage | dict[str, str]] | None = None,
        model: str | None = None,
        request_id: str | None = None,
        stream: bool = True,
        wait: bool = False,
        wait_timeout: float | None = None,
        **params: Any,
    ) -> RequestHandle:
        """Validate and enqueue one request. Raises InvalidRequest (nothing enqueued) or QueueFull.

        `params`: max_tokens, temperature, top_p, top_k, stop, seed, priority ("high", "normal", "low"),
        tenant, deadline or ttl, reply_stream, stream_interval (tokens per event after the first; default: the
        worker's INFERQ_STREAM_INTERVAL, 1 streams every token). A `request_id` that was submitted before is
        not enqueued again: the handle follows the first one. With `wait=True` a full queue is retried
        (jittered, paced by the drain rate) for up to `wait_timeout` seconds (default:
        settings.request_timeout_s) before QueueFull is raised."""
        request, packed = self.build_packed(
            prompt=prompt,
            messages=messages,
            model=model,
            request_id=request_id,
            stream=stream,
            reply_channel=self.channel,
            **params,
        )
        await self.start()
        queue = self._replies.register(request.id)  # before the add: no event can be missed
        try:
            limit = self.settings.request_timeout_s if wait_timeout is None else wait_timeout
            admission = await self._admitter.enqueue(request, wait=wait, wait_s=limit, packed=packed)
        except OUTAGE as exc:
            self._replies.unregister(request.id, queue)
            raise RedisUnavailable(
                f"Redis did not answer the submit ({exc}); request {request.id} may or may not be queued. "
                f"Submit again with request_id={request.id!r}: an id that is queued already is not added twice"
            ) from exc
        except NoPermissionError as exc:
            self._replies.unregister(request.id, queue)
            raise as_inferq_error(exc, f"add request {request.id!r}") from None
        except BaseException:
            self._replies.unregister(request.id, queue)
            raise
        handle = RequestHandle(self, request, queue)
        if admission.code == EXISTS:
            handle.gap = True  # an earlier submit owns this id: its events went elsewhere; use the store
        return handle

    @redis_errors("add requests")
    async def enqueue_many(
        self, requests: list[GenerationRequest], *, packed: list[bytes] | None = None
    ) -> list[Admission]:
        """Admit many built requests at once (bulk callers: no reply route, no task per request). `packed`:
        their payloads from build_packed, sent as they are. Each outcome says admitted, already there
        (idempotent) or refused; refused ones are the caller's to retry."""
        await self.start()
        return await self._admitter.admit_many(requests, packed)

    async def generate(self, **kwargs: Any) -> Result:
        """Submit and wait: the stored result of a request that ended `done`; RequestFailed otherwise."""
        timeout = kwargs.pop("timeout", None)
        handle = await self.submit(stream=False, **kwargs)
        result = await handle.result(timeout=timeout)
        if result.status != "done":
            raise RequestFailed(f"request {result.id} ended {result.status}: {result.error or ''}".rstrip(": "), result)
        return result

    async def cancel(self, request_id: str) -> str:
        """Cancel a request: a queued one ends `cancelled` at once and is skipped when a worker reads it; a
        running one is aborted in the engine by its worker and ends `cancelled` with the text so far.
        Returns the status after the call (a request that had ended already keeps its final status)."""
        (status,) = await self.cancel_many([request_id])
        if not status:
            raise RequestNotFound(f"no request {request_id!r} (never submitted, or its result expired)")
        return status

    @redis_errors("cancel requests")
    async def cancel_many(self, request_ids: list[str]) -> list[str]:
        """Cancel many requests in one round trip; the status after the call for each ('' where there is no
        such request: never submitted, or its result expired)."""
        await self.start()
        statuses = await CANCEL.run_all(self.redis, [self._cancel_call(r, time.time()) for r in request_ids])
        for request_id, status in zip(request_ids, statuses, strict=True):
            if isinstance(status, Exception):
                raise as_inferq_error(status, f"cancel request {request_id!r}") or status
        return [text(status) for status in statuses]

    async def _queued_line(self, request_id: str) -> dict[bytes, bytes]:
        """The state of a bulk job's line that has no result hash: queued if its runner admitted it (its entry
        is in the job's id hash: producer/admit.lua), else nothing."""
        line = self.keys.bulk_line(request_id)
        if line is None:
            return {}
        digest, epoch = line[1].split()
        mark = (await self.redis.hget(line[0], digest) or b"").split()  # type: ignore[misc]
        # '<line> <epoch> <entry id> <lane stream>' while queued; an earlier run's epoch is not this line's
        return {b"status": b"queued"} if len(mark) == 4 and mark[1] == epoch.encode() else {}

    def _cancel_call(self, request_id: str, now: float) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of cancel.lua for one request; a bulk job's line also names where its queued state is."""
        keys, args = [self.keys.result(request_id)], [request_id, repr(now), self.keys.cancel()]
        line = self.keys.bulk_line(request_id)
        if line is not None:  # its result hash, made `cancelled` here, must outlast its entry's longest wait
            keys.append(line[0])
            args += [line[1], self.settings.max_queued_s + self.settings.result_ttl_s]
        return keys, args

    def dead_letters(self, model: str | None = None) -> DeadLetters:
        """The model's dead-letter stream: list, show, retry, purge (inferq.producer.ops.dead_letters)."""
        return DeadLetters(self.redis, self.keys, self._admitter, model or self.settings.model)

    @redis_errors("read the queue's stats")
    async def stats(self, models: list[str] | None = None) -> dict[str, Any]:
        """Queue and worker numbers per model and lane: what `inferq status` shows (ops.stats.collect)."""
        return await stats.collect(self.redis, self.keys, models)

    async def get(self, request_id: str) -> Result:
        """The stored result of any request (queued, running or finished)."""
        key = self.keys.result(request_id)
        try:
            # Batched with the other reads of this loop turn (a closed loop of many callers: one round trip).
            raw = await (self._reads.call(key) if self._started else self.redis.hgetall(key))  # type: ignore[misc]
            if not raw:
                raw = await self._queued_line(request_id)
        except RedisError as exc:
            raise as_inferq_error(exc, f"read request {request_id!r}") or exc from None
        if not raw:
            raise RequestNotFound(f"no request {request_id!r} (never submitted, or its result expired)")
        expires = raw.get(b"expires")
        if raw.get(b"status") == b"queued" and expires is not None and float(expires) <= time.time():
            # Still queued past the time it could wait (no worker read it): it ends `expired` now.
            await EXPIRE(self.redis, [key], [repr(time.time())])
            raw = await self.redis.hgetall(key)  # type: ignore[misc]
        return Result.from_hash(request_id, raw)

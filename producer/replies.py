"""One pub/sub subscription per client process, routing token events to requests by id.

The channel is subscribed once, before any request is added, so no event can be missed and there is no
SUBSCRIBE/UNSUBSCRIBE per request (DESIGN.md "Streaming"). If the connection drops, every open request is
told it may have missed events (GAP) and falls back to its stored result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from pydantic import TypeAdapter, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.codec import unpack
from shared.errors import BadPayload
from shared.schemas import TokenEvent

log = logging.getLogger("inferq.client")


class Signal:
    """A sentinel put in a request's queue next to its token events."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


GAP: Final = Signal("GAP")  # events may have been lost: read the stored result instead
TICK: Final = Signal("TICK")  # time passed: a waiter checks its deadline and, if it heard nothing, the store
DEADLINE: Final = Signal("DEADLINE")  # put by a waiter's own timer
Item = TokenEvent | Signal
# One validation call per message (one engine step), not one per event: this runs for every token.
_EVENTS = TypeAdapter(list[TokenEvent])
# One timer for all requests instead of one per awaited event: waiting for a token then costs no timer.
TICK_S = 0.5


class ReplyListener:
    def __init__(self, redis: Redis, channel: str) -> None:
        self.redis = redis
        self.channel = channel
        self._routes: dict[str, asyncio.Queue[Item]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"inferq-replies-{self.channel}")
        # Wait for the first SUBSCRIBE to be confirmed; later reconnects announce a GAP instead.
        waiter = asyncio.create_task(self._subscribed.wait())
        done, _ = await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            waiter.cancel()
            self._task.result()  # re-raise why the listener could not start
        self._ticker = asyncio.create_task(self._tick(), name=f"inferq-ticker-{self.channel}")

    async def stop(self) -> None:
        for task in (self._task, self._ticker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._ticker = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            for queue in self._routes.values():
                queue.put_nowait(TICK)

    def register(self, request_id: str) -> asyncio.Queue[Item]:
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self._routes[request_id] = queue
        return queue

    def unregister(self, request_id: str) -> None:
        self._routes.pop(request_id, None)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if self._subscribed.is_set():
                    self._announce_gap()  # reconnected: anything published meanwhile is gone
                self._subscribed.set()
                backoff = 0.05
                while True:
                    msg = await pubsub.get_message(timeout=None)
                    if msg is not None and msg["type"] == "message":
                        self._route(msg["data"])
            except (RedisError, OSError) as exc:
                if not self._subscribed.is_set():
                    raise
                log.warning("reply channel lost (%s); reconnecting in %.2fs", exc, backoff)
                self._announce_gap()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _route(self, data: bytes) -> None:
        try:
            message = unpack(data)
            events = _EVENTS.validate_python(message["events"])
        except (BadPayload, ValidationError, KeyError, TypeError) as exc:
            log.warning("dropping undecodable reply message: %s", exc)
            self._announce_gap()
            return
        for event in events:
            queue = self._routes.get(event.id)
            if queue is not None:
                queue.put_nowait(event)

    def _announce_gap(self) -> None:
        for queue in self._routes.values():
            queue.put_nowait(GAP)

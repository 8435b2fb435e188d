"""One pub/sub subscription per client process, routing token events to requests by id.

The channel is subscribed once, before any request is added, so no event can be missed and there is no
SUBSCRIBE/UNSUBSCRIBE per request (docs/CONTRACTS.md, "Streaming"). If the connection drops, every open request is
told it may have missed events (GAP) and falls back to its stored result (shared.subscription).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from typing import Final

from pydantic import TypeAdapter, ValidationError
from redis.asyncio import Redis

from inferq.shared.aio import cancel_and_wait
from inferq.shared.codec import unpack
from inferq.shared.errors import BadPayload
from inferq.shared.schemas import TokenEvent
from inferq.shared.subscription import Subscription

log = logging.getLogger("inferq.client")


class Signal:
    """A sentinel put in a request's queue next to its token events."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


GAP: Final = Signal("GAP")  # events may have been lost: read the stored result instead
TICK: Final = Signal("TICK")  # the time its waiter asked for came (Inbox.poll_at): it may ask the store
Item = TokenEvent | Signal
# One validation call per message (one engine step), not one per event: this runs for every token.
_EVENTS = TypeAdapter(list[TokenEvent])
# One timer for all waiting handles, instead of one per waiting call (this runs per request): a handle's TICK
# comes within TICK_S after the time it asked for.
TICK_S = 0.5


class Inbox:
    """One request handle's items, in order: put without waiting (the router), get by one reader at a time (the
    handle). What asyncio.Queue does for this, without its bookkeeping for many readers and bounds: one is made
    per submit."""

    __slots__ = ("_items", "_waiter", "loop", "poll_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # The listener's loop, for the waiter and its handle's timers: on Python 3.11 each
        # asyncio.get_running_loop() is a getpid() system call, and this runs per request.
        self.loop = loop
        self._items: deque[Item] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.poll_at = math.inf  # when (event-loop time) its waiter wants a TICK; inf: none wanted

    def put_nowait(self, item: Item) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Item:
        while not self._items:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class ReplyListener:
    def __init__(self, redis: Redis, channel: str) -> None:
        self.channel = channel
        # request id -> the queues of its handles (one per submit; the same id submitted twice gets both)
        self._routes: dict[str, list[Inbox]] = {}
        self._subscription = Subscription(redis, channel, self._route, self._announce_gap)
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._subscription.start()
        self._ticker = self._loop.create_task(self._tick(), name=f"inferq-ticker-{self.channel}")

    async def stop(self) -> None:
        await self._subscription.stop()
        await cancel_and_wait(self._ticker)
        self._ticker = None

    async def _tick(self) -> None:
        """A TICK to each handle whose waiter asked for one by now, once (it asks again for the next). The others
        are not woken: a deep backlog of waiting handles costs a look at each every TICK_S, no more."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_S)
            now = loop.time()
            for queues in self._routes.values():
                for queue in queues:
                    if queue.poll_at <= now:
                        queue.poll_at = math.inf
                        queue.put_nowait(TICK)

    def register(self, request_id: str) -> Inbox:
        if self._loop is None:
            raise RuntimeError("the reply listener is not started")
        queue = Inbox(self._loop)
        self._routes.setdefault(request_id, []).append(queue)
        return queue

    def unregister(self, request_id: str, queue: Inbox) -> None:
        queues = self._routes.get(request_id, [])
        if queue in queues:
            queues.remove(queue)
        if not queues:
            self._routes.pop(request_id, None)

    def _route(self, data: bytes) -> None:
        try:
            message = unpack(data)
            events = _EVENTS.validate_python(message["events"])
        except (BadPayload, ValidationError, KeyError, TypeError) as exc:
            log.warning("dropping undecodable reply message: %s", exc)
            self._announce_gap()
            return
        for event in events:
            for queue in self._routes.get(event.id, ()):
                queue.put_nowait(event)

    def _announce_gap(self) -> None:
        for queues in self._routes.values():
            for queue in queues:
                queue.put_nowait(GAP)

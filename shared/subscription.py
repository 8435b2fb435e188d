"""One pub/sub channel that survives a lost connection: resubscribed with backoff, gaps reported.

Pub/sub does not queue: whatever is published while the connection is down is gone. So after a reconnect
the owner is told (`on_gap`) and falls back to what is stored (docs/CONTRACTS.md, "Streaming").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from inferq.shared.aio import cancel_and_wait
from inferq.shared.connection import Backoff, node_client

log = logging.getLogger("inferq")


class Subscription:
    def __init__(
        self,
        redis: Redis,
        channel: str,
        on_message: Callable[[bytes], None],
        on_gap: Callable[[], None] = lambda: None,
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.on_message = on_message
        self.on_gap = on_gap
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        """Subscribe; returns once the server confirmed it, so nothing published after this is missed."""
        self._task = asyncio.create_task(self._run(), name=f"inferq-sub-{self.channel}")
        waiter = asyncio.create_task(self._subscribed.wait())
        done, _ = await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            waiter.cancel()
            self._task.result()  # re-raise why the first subscribe failed

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            node: Redis | None = None
            pubsub = None
            try:
                node = await node_client(self.redis)  # on a cluster: a node of it, another one after a failure
                pubsub = node.pubsub()
                await pubsub.subscribe(self.channel)
                while True:  # the server's confirmation, or its refusal (NOPERM: raised here), comes first
                    msg = await pubsub.get_message(timeout=None)
                    if msg is not None and msg["type"] == "subscribe":
                        break
                if self._subscribed.is_set():
                    self.on_gap()  # reconnected: anything published meanwhile is gone
                self._subscribed.set()
                backoff.reset()
                while True:
                    msg = await pubsub.get_message(timeout=None)
                    if msg is not None and msg["type"] == "message":
                        self.on_message(msg["data"])
            except (RedisError, OSError) as exc:
                if not self._subscribed.is_set():
                    raise
                delay = backoff.next()
                log.warning("channel %s lost (%s); resubscribing in %.2fs", self.channel, exc, delay)
                self.on_gap()
                await asyncio.sleep(delay)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                if node is not None and node is not self.redis:
                    with contextlib.suppress(Exception):
                        await node.aclose()

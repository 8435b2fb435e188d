"""Which models have live workers: from their heartbeats, read at most once a second per gateway, so a
request for a model nobody serves is answered 404 at once instead of waiting out its timeout."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from inferq.producer.ops import stats
from inferq.shared.keys import Keys

_FRESH_S = 1.0


class LiveModels:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._models: dict[str, int] = {}  # model -> unix time it was first seen live by this gateway
        self._read_at = -_FRESH_S
        self._lock = asyncio.Lock()

    async def current(self) -> dict[str, int]:
        """Model id -> when this gateway first saw it served (OpenAI's `created`), for every model with a
        live worker now."""
        async with self._lock:
            if time.monotonic() - self._read_at >= _FRESH_S:
                live = {w["model"] for w in await stats.workers(self.redis, self.keys) if w["model"]}
                now = int(time.time())
                self._models = {model: self._models.get(model, now) for model in sorted(live)}
                self._read_at = time.monotonic()
            return self._models

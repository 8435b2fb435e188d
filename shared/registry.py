"""Who and what exists, for `inferq status` and the retry-after estimate: live workers and known models, kept
in two small sorted sets so that nobody SCANs the keyspace (a million stored results would make that take
seconds). Workers register at each heartbeat; producers once a minute per model they admit to."""

from __future__ import annotations

import time
from typing import Any

from inferq.shared.keys import Keys
from inferq.shared.settings import Settings

# A worker that stopped beating this long ago leaves the index (its heartbeat key expired long before).
FORGET_WORKER_S = 3600


def register(pipe: Any, keys: Keys, settings: Settings, model: str, *, worker: tuple[str, int] | None = None) -> None:
    """Queue on `pipe` the writes that list `model` (and `worker`, (name, heartbeat TTL), alive until then)."""
    now = time.time()
    pipe.zadd(keys.models_index(), {model: now})
    # A model's queue may hold work as long as a request may wait, and its results outlive that.
    pipe.expire(keys.models_index(), settings.max_queued_s + settings.result_ttl_s)
    if worker is not None:
        name, ttl = worker
        pipe.zadd(keys.workers_index(), {name: now + ttl})
        pipe.zremrangebyscore(keys.workers_index(), "-inf", now - FORGET_WORKER_S)
        pipe.expire(keys.workers_index(), FORGET_WORKER_S)

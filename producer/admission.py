"""Atomic admission (DESIGN.md "Admission / backpressure"): cap check, XADD and the queued result in one step.

Every submit runs `admit.lua`; concurrent submits go out together (shared.batching). A dead letter that is
retried goes through the same script, so a retry respects the cap like any new request. A refusal carries
a retry-after estimated from the model's drain rate (its workers' heartbeats); a waiting producer retries
with jittered backoff until admitted or out of time.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis

from producer import stats
from shared.batching import BatchedScript
from shared.codec import pack
from shared.errors import QueueFull
from shared.keys import GROUP, Keys
from shared.schemas import GenerationRequest
from shared.settings import Settings

ADMIT_LUA = resources.files("producer").joinpath("admit.lua").read_text()

ADMITTED, REFUSED, EXISTS, TENANT_FULL = 1, 0, 2, 3


@dataclass(frozen=True)
class Admission:
    code: int  # ADMITTED, REFUSED (lane full), TENANT_FULL or EXISTS (an earlier submit owns this id)
    queue_len: int
    lag: int
    entry_id: str
    tenant_count: int  # the tenant's unfinished requests (after this one, if admitted)


_RATE_TTL_S = 1.0  # how long a measured drain rate is reused: refusals under a flood must stay cheap
_MIN_RETRY_S, _MAX_RETRY_S, _NO_WORKER_RETRY_S = 0.05, 30.0, 2.0


class Admitter:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._script = BatchedScript(redis, ADMIT_LUA, "admit")
        self._rates: dict[str, tuple[float, float]] = {}  # model -> (measured at, requests/s)

    async def enqueue(self, request: GenerationRequest, *, wait: bool = False, wait_s: float = 0.0) -> Admission:
        """Admit `request`; on refusal raise QueueFull, or with `wait` retry (jittered, paced by the drain
        rate) until admitted or `wait_s` has passed."""
        give_up = time.monotonic() + wait_s
        while True:
            admission = await self.admit(request)
            if admission.code not in (REFUSED, TENANT_FULL):
                return admission
            retry_after, note = await self.retry_after(request, admission)
            left = give_up - time.monotonic()
            if not wait or left <= 0:
                tenant = request.tenant if admission.code == TENANT_FULL else None
                raise QueueFull(
                    request.model, admission.queue_len, admission.lag, retry_after, tenant=tenant, note=note
                )
            await asyncio.sleep(min(retry_after * random.uniform(0.5, 1.5), left))

    async def retry_after(self, request: GenerationRequest, admission: Admission) -> tuple[float, str]:
        """Seconds until a refused submit is likely to get in: the excess over the cap at the drain rate."""
        model = request.model
        measured_at, rate = self._rates.get(model, (0.0, 0.0))
        if time.monotonic() - measured_at > _RATE_TTL_S:
            rate = await stats.drain_rate(self.redis, self.keys, model)
            self._rates[model] = (time.monotonic(), rate)
        if rate <= 0:
            return _NO_WORKER_RETRY_S, f" (no worker for model {model!r} finished anything lately: is one running?)"
        if admission.code == TENANT_FULL:
            excess = 1
        else:
            excess = max(admission.queue_len - self.settings.lane_cap(request.priority) + 1, 1)
        return min(max(excess / rate, _MIN_RETRY_S), _MAX_RETRY_S), ""

    def start(self) -> None:
        self._script.start()

    async def stop(self) -> None:
        await self._script.stop()

    async def admit(self, request: GenerationRequest, *, replacing_dead_letter: str | None = None) -> Admission:
        """Enqueue `request` unless its lane is at the cap. With `replacing_dead_letter` (a DLQ entry id),
        the request's failed result is replaced and that dead letter removed in the same atomic step."""
        keys = [
            self.keys.queue(request.model, request.priority),
            self.keys.result(request.id),
            self.keys.tenants(request.model),
        ]
        args: list[object] = [
            self.settings.lane_cap(request.priority),
            self.settings.max_lag,
            GROUP,
            pack(request.payload()),
            request.model,
            repr(request.created_at),
            self.settings.result_ttl_s,
            request.tenant or "",
            self.settings.tenant_cap,
        ]
        if replacing_dead_letter is not None:
            keys.append(self.keys.dlq(request.model))
            args.append(replacing_dead_letter)
        code, queue_len, lag, entry_id, tenant_count = await self._script(keys, args)
        entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return Admission(int(code), int(queue_len), int(lag), entry, int(tenant_count))

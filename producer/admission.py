"""Atomic admission: cap check, XADD and the queued result in one step (docs/CONTRACTS.md, "Admission").

Every submit runs through `admit.lua`; the submits of one event-loop turn go out together, one script call
per lane (shared.batching). A dead letter that is
retried goes through the same script, so a retry respects the cap like any new request. A refusal carries
a retry-after estimated from the model's drain rate (its workers' heartbeats); a waiting producer retries
with jittered backoff until admitted or out of time.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from inferq.producer.ops import stats
from inferq.shared.batching import Batcher
from inferq.shared.codec import pack, text
from inferq.shared.errors import QueueFull
from inferq.shared.keys import GROUP, Keys
from inferq.shared.limits import wait_limit
from inferq.shared.lua import LuaScript
from inferq.shared.registry import register
from inferq.shared.schemas import GenerationRequest
from inferq.shared.settings import Settings

ADMIT = LuaScript("inferq.producer", "admit.lua")

ADMITTED, REFUSED, EXISTS, TENANT_FULL = 1, 0, 2, 3


@dataclass(frozen=True)
class Admission:
    code: int  # ADMITTED, REFUSED (lane full), TENANT_FULL or EXISTS (an earlier submit owns this id)
    queue_len: int
    lag: int
    entry_id: str
    tenant_count: int  # the tenant's unfinished requests (after this one, if admitted)


def _admission(reply: list[Any]) -> Admission:
    code, queue_len, lag, entry_id, tenant_count = reply
    return Admission(int(code), int(queue_len), int(lag), text(entry_id), int(tenant_count))


_RATE_TTL_S = 1.0  # how long a measured drain rate is reused: refusals under a flood must stay cheap
_MIN_RETRY_S, _MAX_RETRY_S, _NO_WORKER_RETRY_S = 0.05, 30.0, 2.0
_MAX_PER_CALL = 256
_RELIST_S = 60.0


def estimate_retry_after(queue_len: int, cap: int, drain_rate: float, *, tenant_full: bool) -> float | None:
    """Seconds until a refused submit is likely to get in: what stands over the cap (for a full tenant, one
    of its own requests) drained at the model's recent completions per second, within [50 ms, 30 s]. None
    when nothing drains: no estimate can be made."""
    if drain_rate <= 0:
        return None
    excess = 1 if tenant_full else max(queue_len - cap + 1, 1)
    return min(max(excess / drain_rate, _MIN_RETRY_S), _MAX_RETRY_S)


# What one submit asks: the request, the DLQ entry it replaces (a retry) or None, its packed payload if the
# caller has it already (the client packs it to check its size) or None.
Ask = tuple[GenerationRequest, str | None, bytes | None]


class Admitter(Batcher[Ask]):
    """Submits of one loop turn are grouped by lane: one admit.lua call per lane admits the lot in order."""

    def __init__(self, redis: Redis, settings: Settings, tenant_caps: Mapping[str, int] | None = None) -> None:
        super().__init__("admit")
        self.redis = redis
        self.settings = settings
        self.tenant_caps = dict(tenant_caps or {})  # tenant -> its own cap, over settings.tenant_cap
        self.keys = Keys.of(settings)
        self._rates: dict[str, tuple[float, float]] = {}  # model -> (measured at, requests/s)
        self._listed: dict[str, float] = {}  # model -> when to list it in the models' index again (monotonic)

    async def admit(
        self, request: GenerationRequest, *, replacing_dead_letter: str | None = None, packed: bytes | None = None
    ) -> Admission:
        """Enqueue `request` unless its lane (or its tenant) is at the cap. With `replacing_dead_letter` (a DLQ
        entry id) the request's failed result is replaced and that dead letter removed in the same step.
        `packed`: the request's payload, packed (codec.pack), if the caller has it."""
        return _admission(await self.call((request, replacing_dead_letter, packed)))

    async def admit_many(self, requests: list[GenerationRequest], packed: list[bytes] | None = None) -> list[Admission]:
        """Admit many requests at once, in order (a bulk caller's path: no task or future per request).
        `packed`: their payloads, packed, if the caller has them. Connection errors are raised; per-request
        outcomes are in the returned list."""
        payloads: list[bytes | None] = [None] * len(requests) if packed is None else list(packed)
        replies = await self.send([(r, None, p) for r, p in zip(requests, payloads, strict=True)])
        out = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            out.append(_admission(reply))
        return out

    async def send(self, items: list[Ask]) -> list[Any]:
        await self._register({request.model for request, _, _ in items})
        by_lane: dict[tuple[str, ...], list[int]] = {}  # (lane, tenant, bulk job) -> positions in `items`
        for i, (request, dead_letter, _) in enumerate(items):
            # The last part is a bulk line's job's id hash: a call admits the lines of one job.
            group = (request.model, request.priority, str(self.keys.shard_of(request.id)), request.tenant or "",
                     self._bulk_line(request)[0])  # fmt: skip
            by_lane.setdefault(group if dead_letter is None else ("retry", str(i)), []).append(i)
        # At most _MAX_PER_CALL per script call: one call blocks the server while it runs.
        groups = [p[at : at + _MAX_PER_CALL] for p in by_lane.values() for at in range(0, len(p), _MAX_PER_CALL)]
        replies = await ADMIT.run_all(self.redis, [self._call([items[i] for i in positions]) for positions in groups])
        results: list[Any] = [None] * len(items)
        for positions, reply in zip(groups, replies, strict=True):
            for n, i in enumerate(positions):
                results[i] = reply if isinstance(reply, Exception) else reply[n]
        return results

    def _call(self, batch: list[Ask]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of one admit.lua call (see the script) for requests of one shard's lane and tenant. The
        caps are split evenly over the shards (a cap of 10 over 3 shards: 4 in each)."""
        first, dead_letter, _ = batch[0]
        model, shard = first.model, self.keys.shard_of(first.id)
        keys = [
            self.keys.queue(model, first.priority, shard), self.keys.tenants(model, shard),
            self.keys.refusals(model, shard),
        ]  # fmt: skip
        keys += [self.keys.result(request.id) for request, _, _ in batch]
        args: list[Any] = [
            self.per_shard(self.settings.lane_cap(first.priority)),
            self.per_shard(self.settings.max_lag),
            GROUP,
            self.per_shard(self.tenant_caps.get(first.tenant or "", self.settings.tenant_cap)),
            len(batch),
            first.tenant or "",
        ]
        args += [pack(request.payload()) if packed is None else packed for request, _, packed in batch]
        now = time.time()
        limits = [wait_limit(request, now, self.settings) for request, _, _ in batch]
        args += [max(math.ceil(limit - now), 0) + self.settings.result_ttl_s for limit in limits]
        args += [repr(limit) for limit in limits]
        if dead_letter is not None:
            keys.append(self.keys.dlq(first.model, shard))
            args += ["retry", dead_letter]
        elif ids := self._bulk_line(first)[0]:  # a bulk job's lines: their queued state goes in its id hash
            keys.append(ids)
            args += ["bulk", *(self._bulk_line(request)[1] for request, _, _ in batch)]
        else:
            args.append("")
        return keys, args

    def _bulk_line(self, request: GenerationRequest) -> tuple[str, str]:
        """(id hash, reference) of a bulk job's line (keys.bulk_line), else ('', '')."""
        return self.keys.bulk_line(request.id) or ("", "")

    async def _register(self, models: set[str]) -> None:
        """List each model in the models' index, once a minute per model (`inferq status` finds queues there)."""
        now = time.monotonic()
        due = [model for model in models if now >= self._listed.get(model, 0.0)]
        if not due:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for model in due:
                register(pipe, self.keys, self.settings, model)
                self._listed[model] = now + _RELIST_S
            await pipe.execute()

    def per_shard(self, cap: int) -> int:
        """A lane's or tenant's cap (0: off) as each of the model's shards holds it."""
        return -(-cap // self.keys.shards)

    async def enqueue(
        self, request: GenerationRequest, *, wait: bool = False, wait_s: float = 0.0, packed: bytes | None = None
    ) -> Admission:
        """Admit `request`; on refusal raise QueueFull, or with `wait` retry (jittered, paced by the drain
        rate) until admitted or `wait_s` has passed."""
        give_up = time.monotonic() + wait_s
        while True:
            admission = await self.admit(request, packed=packed)
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
            try:
                rate = await stats.drain_rate(self.redis, self.keys, model)
            except NoPermissionError:  # the producer role cannot list workers: no estimate, no guess either
                return _NO_WORKER_RETRY_S, ""
            self._rates[model] = (time.monotonic(), rate)
        cap, shards = self.per_shard(self.settings.lane_cap(request.priority)), self.keys.shards
        full = admission.code == TENANT_FULL
        estimate = estimate_retry_after(admission.queue_len, cap, rate / shards, tenant_full=full)
        if estimate is None:
            return _NO_WORKER_RETRY_S, f" (no worker for model {model!r} finished anything lately: is one running?)"
        return estimate, ""

"""What operators and autoscalers watch (`inferq status`, `client.stats()`), and the drain rate behind
QueueFull's retry-after hint. Read-only: a handful of commands per model and shard, nothing per request.
Every figure is the sum over the model's shards."""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis

from inferq.shared.codec import text
from inferq.shared.keys import GROUP, LANES, Keys, group_counts


async def workers(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    """Every live worker's last heartbeat (keys expire a few beats after a worker stops beating), found in the
    workers' index (shared/registry.py)."""
    now = time.time()
    names = [keys.worker(text(name)) for name in await redis.zrangebyscore(keys.workers_index(), now, "+inf")]
    if not names:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(name)
        beats = await pipe.execute()
    out = []
    for key, beat in zip(names, beats, strict=True):
        if not beat:
            continue
        h = {text(k): text(v) for k, v in beat.items()}
        out.append({
            "name": h.get("name", key),
            "model": h.get("model", ""),
            "engine": h.get("engine", ""),
            "host": h.get("host", ""),
            "capacity": int(h.get("capacity", 0)),
            "slots": int(h.get("slots", h.get("capacity", 0))),
            "inflight": int(h.get("inflight", 0)),
            "tokens_per_s": float(h.get("tokens_per_s", 0)),
            "completions_per_s": float(h.get("completions_per_s", 0)),
            "completed": int(h.get("completed", 0)),
            "last_seen_s": round(now - float(h.get("last_seen", now)), 1),
        })  # fmt: skip
    return sorted(out, key=lambda w: (w["model"], w["name"]))


async def drain_rate(redis: Redis, keys: Keys, model: str) -> float:
    """Requests per second the model's live workers finished recently (sum of their heartbeats)."""
    return sum(w["completions_per_s"] for w in await workers(redis, keys) if w["model"] == model)


def _empty_lane() -> dict[str, Any]:
    return {"length": 0, "lag": 0, "pending": 0, "oldest_pending_s": None, "consumers": []}


async def lane_stats(redis: Redis, streams: list[str]) -> list[dict[str, Any]]:
    """Length, lag, pending, oldest pending age and consumers of each lane stream, all in one round trip (a
    status with many shards costs no more waits than one with one). A stream or group that does not exist
    answers with an error, read as empty."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, GROUP)
            pipe.xinfo_consumers(stream, GROUP)
        replies = await pipe.execute(raise_on_error=False)
    out = []
    now = time.time()
    for at in range(0, len(replies), 4):
        length, groups, summary, consumers = replies[at : at + 4]
        one = _empty_lane()
        one["length"] = 0 if isinstance(length, Exception) else int(length)
        counts = group_counts(groups, one["length"])  # None for an error: no stream, or no group
        if counts is not None:
            one["pending"], lag = counts
            one["lag"] = lag or 0
            if one["pending"] and isinstance(summary, dict) and summary.get("min"):
                oldest_ms = int(text(summary["min"]).split("-")[0])  # an entry id starts with its add time
                one["oldest_pending_s"] = round(now - oldest_ms / 1000, 1)
            if isinstance(consumers, list):
                one["consumers"] = [
                    {"name": text(c["name"]), "pending": int(c["pending"]), "idle_ms": int(c["idle"])}
                    for c in consumers
                ]
        out.append(one)
    return out


def lane_total(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """`lane_stats` of one lane's shard streams, summed (the oldest pending is the oldest of all; a consumer's
    pending summed, its idle time the least)."""
    total = _empty_lane()
    consumers: dict[str, dict[str, Any]] = {}
    for one in shards:
        for name in ("length", "lag", "pending"):
            total[name] += one[name]
        if one["oldest_pending_s"] is not None:
            total["oldest_pending_s"] = max(total["oldest_pending_s"] or 0.0, one["oldest_pending_s"])
        for c in one["consumers"]:
            seen = consumers.setdefault(c["name"], {"name": c["name"], "pending": 0, "idle_ms": c["idle_ms"]})
            seen["pending"] += c["pending"]
            seen["idle_ms"] = min(seen["idle_ms"], c["idle_ms"])
    total["consumers"] = list(consumers.values())
    return total


async def lanes(redis: Redis, keys: Keys, model: str) -> dict[str, dict[str, Any]]:
    """Each lane of the model, summed over its shards, in one round trip."""
    per_lane = {lane: [keys.queue(model, lane, shard) for shard in range(keys.shards)] for lane in LANES}
    found = iter(await lane_stats(redis, [stream for streams in per_lane.values() for stream in streams]))
    return {lane: lane_total([next(found) for _ in streams]) for lane, streams in per_lane.items()}


async def _summed(redis: Redis, keys: Keys, model: str) -> dict[str, Any]:
    """The model's DLQ size, dropped letters and tenants' unfinished counts, summed over its shards."""
    shards = range(keys.shards)
    async with redis.pipeline(transaction=False) as pipe:
        for shard in shards:
            pipe.xlen(keys.dlq(model, shard))
            pipe.get(keys.dlq_dropped(model, shard))
            pipe.hgetall(keys.tenants(model, shard))
        replies = await pipe.execute()
    out: dict[str, Any] = {"dlq": 0, "dlq_dropped": 0, "tenants": {}}
    for dlq, dropped, tenants in zip(replies[0::3], replies[1::3], replies[2::3], strict=True):
        out["dlq"] += int(dlq)
        out["dlq_dropped"] += int(dropped or 0)
        for tenant, count in tenants.items():
            out["tenants"][text(tenant)] = out["tenants"].get(text(tenant), 0) + int(count)
    return out


async def models(redis: Redis, keys: Keys) -> list[str]:
    """Models with a queue stream or a live worker, from the models' index (shared/registry.py); a model with
    neither leaves the index here."""
    live = {w["model"] for w in await workers(redis, keys) if w["model"]}
    listed = sorted({text(m) for m in await redis.zrange(keys.models_index(), 0, -1)} - live)
    async with redis.pipeline(transaction=False) as pipe:
        for model in listed:
            for lanes in keys.all_queues(model):
                for stream in lanes:
                    pipe.exists(stream)
        found = iter(await pipe.execute())
    per_model = len(LANES) * keys.shards
    queued = {model for model in listed if any([next(found) for _ in range(per_model)])}
    if gone := set(listed) - queued:
        await redis.zrem(keys.models_index(), *gone)
    return sorted(live | queued)


async def collect(redis: Redis, keys: Keys, only: list[str] | None = None) -> dict[str, Any]:
    """Per model: each lane's numbers, DLQ size, tenants' unfinished counts, live workers, completion rate."""
    live = await workers(redis, keys)
    report: dict[str, Any] = {"time": time.time(), "models": {}}
    for model in only or await models(redis, keys):
        mine = [w for w in live if w["model"] == model]
        report["models"][model] = {
            "lanes": await lanes(redis, keys, model),
            **await _summed(redis, keys, model),
            "workers": mine,
            "completions_per_s": round(sum(w["completions_per_s"] for w in mine), 2),
            "tokens_per_s": round(sum(w["tokens_per_s"] for w in mine), 1),
        }
    return report

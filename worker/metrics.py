"""A worker's Prometheus series (docs/METRICS.md lists them): its own `inferq_*` ones, counted as requests end,
and the queue's, read from Redis when scraped. vLLM's `vllm:*` series come from vLLM's own stat logger, in
prometheus_client's default registry, and are served beside these as vLLM serves them (worker/probe.py).

Queue series (lane length, lag, pending, admissions, refusals, dead letters) describe the whole queue of the
model: every worker of it reports the same numbers, so aggregate them with max(), not sum().
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from inferq.shared.codec import text
from inferq.shared.connection import execute_all
from inferq.shared.keys import LANES, Keys, group_counts
from inferq.shared.schemas import FINAL_STATES

# From a few milliseconds (a short queue wait) to an hour (a long generation, a deep backlog).
REFUSAL_REASONS = ("queue_full", "lag_cap", "tenant_cap")  # admit.lua's names for why it refused
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def queued_at(entry_id: str) -> float:
    """When an entry was added: a stream entry id starts with its add time in milliseconds."""
    return int(entry_id.split("-")[0]) / 1000


class WorkerMetrics:
    """This worker's series, in a registry of its own (two workers in one process keep apart)."""

    def __init__(self, keys: Keys, model: str) -> None:
        self.registry = CollectorRegistry()
        self.keys = keys
        self.model = model
        r = self.registry
        self.ended = Counter(
            "inferq_requests_ended", "requests this worker ended, by final status", ["model", "lane", "status"],
            registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "inferq_queue_wait_seconds", "time from admission to the start of the run (requests that ran)",
            ["model", "lane"], buckets=SECONDS, registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "inferq_request_duration_seconds", "time from admission to the stored final state, every status",
            ["model", "lane"], buckets=SECONDS, registry=r,
        )  # fmt: skip
        self.generated = Counter("inferq_generation_tokens", "tokens generated", ["model"], registry=r)
        self.prompt = Counter("inferq_prompt_tokens", "prompt tokens of the requests that ran", ["model"], registry=r)
        self.redelivered = Counter(
            "inferq_redeliveries", "entries this worker got that an earlier delivery did not end", ["model", "lane"],
            registry=r,
        )  # fmt: skip
        self.taken_over = Counter(
            "inferq_claims_taken_over", "entries taken over from a worker that died or stalled (XCLAIM)",
            ["model", "lane"], registry=r,
        )  # fmt: skip
        self.lost = Counter(
            "inferq_claims_lost", "entries of this worker another worker took over before it ended them",
            ["model", "lane"], registry=r,
        )  # fmt: skip
        self.bad_entries = Counter(
            "inferq_bad_entries", "queue entries dead-lettered that name no request of their own: undecodable, "
            "no usable id, or forged", ["model", "lane"], registry=r,
        )  # fmt: skip
        self.running = Gauge("inferq_requests_running", "requests in this worker now", ["model"], registry=r)
        self.slots = Gauge(
            "inferq_slots", "requests this worker takes at most now (flow control)", ["model"], registry=r
        )
        self.queue = QueueSeries(keys, model)
        r.register(self.queue)
        # Every series made at 0 from the start (a rate() over a counter that appears only at its first event
        # misses it), and each lane's children kept by stream name: the hot path looks nothing up.
        series = {lane: LaneSeries(self, lane) for lane in LANES}
        self.lanes = {keys.queue(model, lane, shard): series[lane] for shard in range(keys.shards) for lane in LANES}
        self._generated = self.generated.labels(model)
        self._prompt = self.prompt.labels(model)

    def of(self, stream: str) -> LaneSeries:
        """The series of one of the model's lane streams."""
        return self.lanes[stream]

    def started(self, stream: str, entry_id: str) -> None:
        self.lanes[stream].queue_wait.observe(max(time.time() - queued_at(entry_id), 0.0))

    def finished(self, stream: str, entry_id: str, status: str, prompt_tokens: int, tokens: int) -> None:
        series = self.lanes[stream]
        series.ended[status].inc()
        series.duration.observe(max(time.time() - queued_at(entry_id), 0.0))
        if tokens:
            self._generated.inc(tokens)
        if prompt_tokens:
            self._prompt.inc(prompt_tokens)


class LaneSeries:
    """One lane's labelled series of a worker, made once."""

    def __init__(self, metrics: WorkerMetrics, lane: str) -> None:
        labels = (metrics.model, lane)
        self.lane = lane
        self.ended = {status: metrics.ended.labels(*labels, status) for status in sorted(FINAL_STATES)}
        self.queue_wait = metrics.queue_wait.labels(*labels)
        self.duration = metrics.duration.labels(*labels)
        self.redelivered = metrics.redelivered.labels(*labels)
        self.taken_over = metrics.taken_over.labels(*labels)
        self.lost = metrics.lost.labels(*labels)
        self.bad_entries = metrics.bad_entries.labels(*labels)


class QueueSeries(Collector):
    """The model's queue as Redis holds it, summed over its shards, read by `refresh` (one pipelined round trip)
    before each scrape."""

    def __init__(self, keys: Keys, model: str) -> None:
        self.keys = keys
        self.model = model
        self._lanes: list[dict[str, int]] = []
        self._dead = self._dropped = 0
        self._refused: dict[str, int] = {}

    async def refresh(self, redis: Redis) -> None:
        shards = range(self.keys.shards)
        async with redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                for stream in self.keys.queues(self.model, shard):
                    pipe.xinfo_stream(stream)
                    pipe.xinfo_groups(stream)
                pipe.xlen(self.keys.dlq(self.model, shard))
                pipe.get(self.keys.dlq_dropped(self.model, shard))
                pipe.hgetall(self.keys.refusals(self.model, shard))
            replies = iter(await execute_all(redis, pipe))
        lanes = [dict.fromkeys(("length", "lag", "pending", "added"), 0) for _ in LANES]
        self._dead = self._dropped = 0
        self._refused = {}
        for _ in shards:
            for summed in lanes:
                for name, n in _lane(next(replies), next(replies)).items():
                    summed[name] += n
            self._dead += _count(next(replies)) or 0
            self._dropped += _count(next(replies)) or 0
            for field, n in _refusals(next(replies)).items():
                self._refused[field] = self._refused.get(field, 0) + n
        self._lanes = lanes

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "lane"]
        length = GaugeMetricFamily(
            "inferq_lane_length", "entries in the lane's stream (unfinished requests)", labels=labels
        )
        lag = GaugeMetricFamily("inferq_lane_lag", "entries in the lane no worker has read yet", labels=labels)
        pending = GaugeMetricFamily("inferq_lane_pending", "entries read by a worker and not yet ended", labels=labels)
        admitted = CounterMetricFamily("inferq_admissions", "requests admitted to the lane", labels=labels)
        for lane, numbers in zip(LANES, self._lanes, strict=False):
            length.add_metric([self.model, lane], numbers["length"])
            lag.add_metric([self.model, lane], numbers["lag"])
            pending.add_metric([self.model, lane], numbers["pending"])
            admitted.add_metric([self.model, lane], numbers["added"])
        refused = CounterMetricFamily(
            "inferq_refusals", "submits the admission refused, by reason", labels=["model", "lane", "reason"]
        )
        for field, count in sorted(self._refused.items()):
            lane, _, reason = field.partition(":")
            refused.add_metric([self.model, lane, reason], count)
        dead = GaugeMetricFamily("inferq_dead_letters", "letters in the model's DLQ", labels=["model"])
        dead.add_metric([self.model], self._dead)
        dropped = CounterMetricFamily(
            "inferq_dead_letters_dropped", "dead letters dropped past INFERQ_DLQ_MAX_LEN", labels=["model"]
        )
        dropped.add_metric([self.model], self._dropped)
        yield from (length, lag, pending, admitted, refused, dead, dropped)


def _refusals(reply: Any) -> dict[str, int]:
    """The refusal counters as admit.lua writes them. A producer may write that hash too (docs/CONTRACTS.md, "Who
    may do what"): fields of any other shape, or values that are not counts, are left out, so neither a label
    nobody defined nor a broken scrape can come of it."""
    if not isinstance(reply, dict):
        return {}
    out = {}
    for raw, count in reply.items():
        field = text(raw)
        lane, _, reason = field.partition(":")
        if lane in LANES and reason in REFUSAL_REASONS and (n := _count(count)) is not None:
            out[field] = n
    return out


def _count(reply: Any) -> int | None:
    """A count Redis answered, or None for none (no key, an error, not a number)."""
    try:
        return None if reply is None or isinstance(reply, Exception) else max(int(reply), 0)
    except ValueError:
        return None


def _lane(info: Any, groups: Any) -> dict[str, int]:
    if isinstance(info, Exception) or isinstance(groups, Exception):  # no stream yet
        return {"length": 0, "lag": 0, "pending": 0, "added": 0}
    length = int(info["length"])
    added = int(info.get("entries-added", length))
    pending, lag = group_counts(groups, length) or (0, 0)
    return {"length": length, "lag": lag or 0, "pending": pending, "added": added}

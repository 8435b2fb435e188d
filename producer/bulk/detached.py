"""Detached bulk jobs: `inferq bulk submit` stages the input in Redis and hands the job to arq;
the worker fleet runs it; `status`, `list`, `cancel` and `download` work from any machine.

A job runs as a chain of arq steps of `bulk_slice_s` each: a step feeds and counts under the job's lease
(bulk.running), then enqueues the next. arq re-runs a step whose process died once that step's
in-progress mark lapses (its timeout plus 10 s), so a job outlives any one runner, and since every feed and
count commit is compare-and-set on the job's state, a re-run step picks up exactly where the dead one
committed. arq jobs are serialized with msgpack, never pickle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
from arq.connections import ArqRedis
from arq.worker import Retry, Worker, func
from redis.asyncio import Redis
from redis.backoff import EqualJitterBackoff

from inferq.producer.bulk.arq_keys import PrefixedArqRedis
from inferq.producer.bulk.attached import runner_name
from inferq.producer.bulk.formats import file_kind
from inferq.producer.bulk.inputs import StagedLines, numbered_lines, stage
from inferq.producer.bulk.output import write_output
from inferq.producer.bulk.running import LEASE_S, BulkRunner, JobBusy, LeaseLost
from inferq.producer.bulk.state import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    DETACHED,
    ENDED,
    FAILED,
    IN_PROGRESS,
    VALIDATING,
    BulkStore,
    JobRecord,
)
from inferq.producer.client import InferenceClient
from inferq.shared.connection import OUTAGE, connect, is_cluster, redis_errors
from inferq.shared.errors import ConfigError, InferqError, InvalidRequest, RequestNotFound
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings

log = logging.getLogger("inferq.bulk")
STEP = "inferq_bulk_step"
_STEP_RETRY = EqualJitterBackoff(cap=30.0, base=0.5)  # a step that lost Redis waits this long to run again


def _arq_redis(settings: Settings) -> ArqRedis:
    pool = connect(settings, max_connections=16).connection_pool
    keys = Keys.of(settings)
    return PrefixedArqRedis(
        keys, pool, job_serializer=msgpack.packb, job_deserializer=msgpack.unpackb, default_queue_name=keys.arq_queue()
    )


def no_cluster(redis: Redis) -> None:
    """arq's queue takes a single Redis (its steps are transactions over keys of many slots)."""
    if is_cluster(redis):
        raise ConfigError(
            "detached bulk jobs run on arq, which needs a single Redis, not a cluster: run the job attached "
            "(`inferq bulk FILE -o OUT`)"
        )


async def _enqueue_step(arq: ArqRedis, keys: Keys, job: str, step: int) -> None:
    await arq.enqueue_job(STEP, job, step, _job_id=keys.arq_step(job, step), _queue_name=keys.arq_queue())


class BulkJobs:
    """The detached-job commands, on one client's connection."""

    def __init__(self, client: InferenceClient) -> None:
        self.client = client
        self.store = BulkStore(client.redis, client.keys, client.settings.bulk_ttl_s)

    @redis_errors("submit a bulk job")
    async def submit(self, input_path: Path, *, model: str | None = None) -> JobRecord:
        """Stage the input in Redis and queue the job's first step; returns the job (state validating)."""
        no_cluster(self.client.redis)
        path = input_path.resolve()  # noqa: ASYNC240 - one stat of the file the user named
        if not path.is_file():
            raise InvalidRequest(f"input file {input_path} does not exist")
        job = JobRecord(
            id=f"bj-{uuid.uuid4().hex[:16]}", mode=DETACHED, model=model or self.client.settings.model,
            input=str(path), format=file_kind(numbered_lines(path)), created_at=time.time(),
        )  # fmt: skip
        await self.store.create(job)
        job.total, job.chunks = await stage(self.store, job.id, input_path)
        await self.store.update(job.id, total=job.total, chunks=job.chunks)
        arq = _arq_redis(self.client.settings)
        try:
            await _enqueue_step(arq, self.client.keys, job.id, 0)
        finally:
            await arq.aclose(close_connection_pool=True)
        return job

    @redis_errors("read a bulk job")
    async def get(self, job: str) -> JobRecord:
        record = await self.store.get(job)
        if record is None:
            raise RequestNotFound(
                f"no bulk job {job!r} (never submitted, or it ended more than INFERQ_BULK_TTL_S seconds ago)"
            )
        return record

    @redis_errors("list bulk jobs")
    async def list(self, limit: int = 50) -> list[JobRecord]:
        return await self.store.list(limit)

    @redis_errors("cancel a bulk job")
    async def cancel(self, job: str) -> str:
        """Ask the job to stop: no more lines are fed, outstanding requests are cancelled; returns the state."""
        await self.get(job)
        return await self.store.change_state(job, CANCELLING, {VALIDATING, IN_PROGRESS})

    @redis_errors("download a bulk job's output")
    async def download(self, job: str, output: Path, *, wait: bool = False) -> tuple[JobRecord, int]:
        """Write the job's output to `output` (resuming a partial download); with `wait`, until it ends."""
        record = await self.get(job)
        while record.state not in ENDED:
            if not wait:
                raise InferqError(
                    f"bulk job {job} is {record.state} ({record.accounted}/{record.total} lines); "
                    "download it when it has ended, or pass --wait"
                )
            await asyncio.sleep(1.0)  # a person waiting at a terminal: once a second is plenty
            record = await self.get(job)
        if record.mode != DETACHED:
            raise InferqError(f"bulk job {job} ran attached; its output is {record.output}")
        lines = await write_output(self.store, job, output)
        return record, lines


async def bulk_step(ctx: dict[str, Any], job_id: str, step: int) -> str:
    """One arq step of a detached job (see the module's docstring); returns what happened, for arq's log. A
    lost Redis connection is retried (arq's Retry, backing off): the step picks the job up where it stands."""
    try:
        return await _step(ctx, job_id, step)
    except OUTAGE as exc:
        delay = _STEP_RETRY.compute(int(ctx.get("job_try", 1)))
        log.warning("bulk job %s, step %d: Redis connection lost (%s); retrying in %.1fs", job_id, step, exc, delay)
        raise Retry(defer=delay) from exc


async def _step(ctx: dict[str, Any], job_id: str, step: int) -> str:
    client: InferenceClient = ctx["client"]
    store = BulkStore(client.redis, client.keys, client.settings.bulk_ttl_s)
    job = await store.get(job_id)
    if job is None or job.state in ENDED:
        return "gone" if job is None else job.state
    runner = BulkRunner(client, store, job, StagedLines(store, job_id, job.chunks), name=ctx["runner"])
    try:
        job = await runner.run(until=time.monotonic() + client.settings.bulk_slice_s)
    except JobBusy as exc:
        # Another runner holds the lease, or a try of this step that lost Redis could not give it back: it
        # lapses within LEASE_S. Try again then, rather than end the chain of steps that carries the job.
        raise Retry(defer=LEASE_S) from exc
    except LeaseLost as exc:
        return f"left to another runner: {exc}"  # the runner that took the job over carries it on
    except InferqError as exc:
        log.error("bulk job %s failed: %s", job_id, exc)
        await store.update(job_id, error=str(exc))
        await store.finish(job_id, FAILED, keep_output=True)
        return FAILED
    if job.all_accounted:
        final = CANCELLED if job.state == CANCELLING else COMPLETED
        await store.finish(job_id, final, keep_output=True)
        log.info("bulk job %s %s: %d lines", job_id, final, job.accounted)
        return final
    await _enqueue_step(ctx["redis"], client.keys, job_id, step + 1)
    return f"{job.accounted}/{job.total} lines"


@contextlib.asynccontextmanager
async def bulk_runner(
    settings: Settings, *, name: str | None = None, max_jobs: int = 4, beside_worker: bool = False
) -> AsyncIterator[Worker | None]:
    """An arq worker that runs detached jobs' steps in this process's event loop, until the context exits
    (which cancels a running step; arq retries it elsewhere). Signals stay with the caller. On a cluster there
    is none: an error, or `beside_worker` (the runner a worker starts by default) one warning and nothing."""
    slice_s = settings.bulk_slice_s
    async with InferenceClient(settings) as client:
        if beside_worker and is_cluster(client.redis):
            log.warning("no detached bulk jobs here: arq needs a single Redis, not a cluster (attached jobs run)")
            yield None
            return
        no_cluster(client.redis)
        arq = await asyncio.to_thread(_arq_redis, settings)  # may start the embedded server: off the loop
        worker = Worker(
            functions=[func(bulk_step, name=STEP, timeout=2 * slice_s + 5, max_tries=10_000, keep_result=60)],
            redis_pool=arq, queue_name=client.keys.arq_queue(), handle_signals=False, max_jobs=max_jobs,
            job_serializer=msgpack.packb, job_deserializer=msgpack.unpackb, poll_delay=0.5,
            ctx={"client": client, "runner": name or runner_name("arq")},
        )  # fmt: skip
        main = asyncio.create_task(worker.main(), name="inferq-bulk-runner")
        try:
            yield worker
        finally:
            await worker.close()
            main.cancel()
            # A runner stopped as it starts (its worker's engine died at once): arq's close shuts the pool its
            # main task is still starting on, which then fails to reach Redis. That is no news at this point.
            with contextlib.suppress(asyncio.CancelledError, *OUTAGE):
                await main

"""Peer queues on Redis doing no-op jobs, counted as `inferq bench queue` counts inferq.

    python benchmarks/peers.py --peers arq,celery,bullmq --producers 1,64,256 --workers 1 --seconds 10 [--json out.json]

Method. Each peer gets its own fresh server (`temporary_server`: valkey, AOF on, as for `inferq bench queue`)
and W worker processes, each in its own process group (this script run as `peers.py _worker PEER URL`, stopped
with SIGTERM, then SIGKILL to the group). A worker counts as up once it has INCRed a key after connecting.
Then, for each producer count N: N producers in a closed loop (each enqueues its next job once it holds the
previous job's result) run for a 1 s warm-up that is not counted, then for `--seconds`. A job counts from
just before its enqueue until the producer has its result in hand; jobs/s = jobs completed / wall time
(until the last producer stops, as in bench/queue.py); p50/p99 of those times; Redis CPU = INFO cpu
(used_cpu_sys + used_cpu_user) delta over wall time. Each peer uses its defaults except:

- arq: a no-op coroutine; `Worker(max_jobs=256, poll_delay=0.01)` (default 0.5 s: the worker polls the
  queue's sorted set; 0.01 s is what a latency-minded user would set). Producers `await pool.enqueue_job()`,
  then `await job.result(poll_delay=0.01)` (default 0.5 s): arq has no push for results, each waiting producer
  polls GET + ZSCORE every 10 ms, so Redis's load grows with the number waiting.
- Celery: Redis broker and Redis result backend, a no-op task, `celery worker --pool threads --concurrency
  64 --without-gossip --without-mingle --without-heartbeat` (through `app.worker_main`, the same CLI; no
  gevent/eventlet here, and prefork would spread 64 processes over 2 cores). Celery's client is synchronous:
  each producer is a plain thread (a pool of N threads) calling `task.delay().get()`; `get()` waits on the
  backend's pub/sub, not a poll. Default prefetch (4 x concurrency) and broker pool (10 connections).
  Celery < 5.7 deadlocks here (celery/celery#10477), so the producer applies the upstream fix; see below.
- BullMQ (Python): `Worker(concurrency=256)` (`--bullmq-concurrency`) with a no-op async processor;
  `await queue.add()` with a job id chosen by the producer. This version (2.15, the last that takes
  redis-py 5, which arq needs) has no QueueEvents/waitUntilFinished, so completion is read as Node's
  QueueEvents reads it: one XREAD BLOCK loop on the queue's events stream, waking the producer whose job id
  has a "completed"/"failed" event. Completed jobs are kept (BullMQ's default). Its worker, once it has a
  job, starts a fetch (a moveToActive script) for every free slot at once, so a high concurrency costs
  Redis work per job: concurrency 32 beat 256 by 3x at 8 producers in a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from inferq.bench.server import temporary_server

READY = "peers:ready"  # each worker process INCRs it once it is connected and about to consume
QUEUE = "peers"
WARMUP_S = 1.0
TIMEOUT_S = 30.0  # a job without its result after this counts as an error
ARQ_POLL_S = 0.01  # worker queue poll and producer result poll
CELERY_WORKER = ["--pool", "threads", "--concurrency", "64", "--without-gossip", "--without-mingle"]
CELERY_WORKER += ["--without-heartbeat", "--loglevel", "WARNING"]
BULLMQ_CONCURRENCY = "PEERS_BULLMQ_CONCURRENCY"  # env: its worker's concurrency (--bullmq-concurrency)

Call = Callable[[], Awaitable[float]]  # enqueue one job, wait for its result; returns seconds end to end


# --- workers: run in their own processes (`peers.py _worker PEER URL`) ---


def arq_worker(url: str) -> None:
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    async def noop(ctx: dict[str, Any]) -> None:
        return None

    async def ready(ctx: dict[str, Any]) -> None:
        await ctx["redis"].incr(READY)

    settings = RedisSettings.from_dsn(url)
    Worker(
        [func(noop, name="noop")], redis_settings=settings, max_jobs=256, poll_delay=ARQ_POLL_S, on_startup=ready
    ).run()


def celery_noop() -> None:
    return None


def celery_app(url: str) -> Any:
    from celery import Celery

    app = Celery(QUEUE, broker=url, backend=url)
    app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
    app.task(name="peers.noop")(celery_noop)
    return app


def celery_worker(url: str) -> None:
    import redis
    from celery.signals import worker_ready

    worker_ready.connect(lambda **_: redis.Redis.from_url(url).incr(READY), weak=False)
    celery_app(url).worker_main(["worker", *CELERY_WORKER])


def bullmq_worker(url: str) -> None:
    from bullmq import Worker

    async def noop(job: Any, token: str) -> None:
        return None

    async def main() -> None:
        worker = Worker(QUEUE, noop, {"connection": url, "concurrency": int(os.environ[BULLMQ_CONCURRENCY])})
        await worker.client.incr(READY)
        await asyncio.Event().wait()  # until SIGTERM

    asyncio.run(main())


WORKERS: dict[str, Callable[[str], None]] = {"arq": arq_worker, "celery": celery_worker, "bullmq": bullmq_worker}


# --- producers: a Call per peer, in this process ---


@contextlib.asynccontextmanager
async def arq_producer(url: str, producers: int) -> AsyncIterator[Call]:
    from arq import create_pool
    from arq.connections import RedisSettings

    pool = await create_pool(RedisSettings.from_dsn(url))

    async def call() -> float:
        t0 = time.perf_counter()
        job = await pool.enqueue_job("noop")
        assert job is not None
        await job.result(timeout=TIMEOUT_S, poll_delay=ARQ_POLL_S)
        return time.perf_counter() - t0

    try:
        yield call
    finally:
        await pool.aclose()


def celery_deadlock_fix() -> None:
    """Celery < 5.7's Redis result backend deadlocks when the cyclic GC finalizes a spent AsyncResult inside
    the SUBSCRIBE of the next task (celery/celery#10477, fixed in 5.7.0): within seconds at 8 producers. Here
    the first merged fix (celery/celery#10497): no second UNSUBSCRIBE for a task already unsubscribed."""
    from celery.backends.redis import ResultConsumer

    if hasattr(ResultConsumer, "_flush_pending_unsubscribe"):  # 5.7's own fix is there
        return
    cancel_for = ResultConsumer.cancel_for

    def idempotent(self: Any, task_id: str) -> None:
        if self._get_key_for_task(task_id) in self.subscribed_to:
            cancel_for(self, task_id)

    ResultConsumer.cancel_for = idempotent


@contextlib.asynccontextmanager
async def celery_producer(url: str, producers: int) -> AsyncIterator[Call]:
    celery_deadlock_fix()
    app = celery_app(url)
    noop = app.tasks["peers.noop"]
    threads = ThreadPoolExecutor(max_workers=producers)  # one thread per producer: delay() and get() block

    def timed() -> float:
        t0 = time.perf_counter()
        noop.delay().get(timeout=TIMEOUT_S)
        return time.perf_counter() - t0

    async def call() -> float:
        return await asyncio.get_running_loop().run_in_executor(threads, timed)

    try:
        yield call
    finally:
        threads.shutdown(wait=True)
        app.close()


@contextlib.asynccontextmanager
async def bullmq_producer(url: str, producers: int) -> AsyncIterator[Call]:
    from bullmq import Queue

    queue = Queue(QUEUE, {"connection": url})
    events = Redis.from_url(url, decode_responses=True)  # its own connection: XREAD BLOCK holds it
    key = queue.keys["events"]
    last = next(iter(await events.xrevrange(key, count=1)), ("0-0", {}))[0]
    waiters: dict[str, asyncio.Future[str]] = {}

    async def read_events() -> None:
        nonlocal last
        while True:
            for _, entries in await events.xread({key: last}, block=1000) or []:
                for entry_id, fields in entries:
                    last = entry_id  # the next read starts after it
                    if fields.get("event") in ("completed", "failed"):
                        waiter = waiters.pop(fields["jobId"], None)
                        if waiter and not waiter.done():
                            waiter.set_result(fields["event"])

    async def call() -> float:
        job_id = uuid.uuid4().hex
        done = waiters[job_id] = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        try:
            await queue.add("noop", {}, {"jobId": job_id})
            if await asyncio.wait_for(done, TIMEOUT_S) != "completed":
                raise RuntimeError(f"job {job_id} failed")
        finally:
            waiters.pop(job_id, None)
        return time.perf_counter() - t0

    reader = asyncio.create_task(read_events())
    try:
        yield call
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await events.aclose()
        await queue.close()


PRODUCERS: dict[str, Callable[[str, int], contextlib.AbstractAsyncContextManager[Call]]] = {
    "arq": arq_producer,
    "celery": celery_producer,
    "bullmq": bullmq_producer,
}


# --- the harness ---


async def closed_loop(call: Call, producers: int, seconds: float) -> tuple[list[float], list[str]]:
    """`producers` callers, each enqueuing its next job once it has the last one's result, for `seconds`."""
    times: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    async def producer() -> None:
        while time.perf_counter() < stop:
            try:
                times.append(await call())
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(producer() for _ in range(producers)))
    return times, errors


async def redis_cpu_s(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def measure(redis: Redis, call: Call, producers: int, seconds: float) -> dict[str, Any]:
    await closed_loop(call, producers, WARMUP_S)
    cpu0, t0 = await redis_cpu_s(redis), time.perf_counter()
    times, errors = await closed_loop(call, producers, seconds)
    wall = time.perf_counter() - t0
    cpu = await redis_cpu_s(redis) - cpu0
    ordered = sorted(times) or [0.0]
    return {
        "producers": producers, "completed": len(times), "errors": len(errors), "jobs_per_s": len(times) / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "redis_cpu_pct": 100 * cpu / wall, "first_error": errors[0] if errors else None,
    }  # fmt: skip


def spawn_worker(peer: str, url: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        argv = [sys.executable, str(Path(__file__).resolve()), "_worker", peer, url]
        return subprocess.Popen(argv, stdout=fh, stderr=fh, start_new_session=True)


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each worker's process group, up to 10 s to go, then SIGKILL whatever is left of the group."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def bench_peer(
    peer: str, workers: int, producers: list[int], seconds: float, on_row: Callable[[dict[str, Any]], None]
) -> list[dict[str, Any]]:
    server = temporary_server()
    procs: list[subprocess.Popen[bytes]] = []
    rows = []
    try:
        async with Redis.from_url(server.url) as redis:
            logs = [server.dir.parent / f"{peer}-worker-{i}.log" for i in range(workers)]
            procs = [spawn_worker(peer, server.url, log) for log in logs]
            deadline = time.monotonic() + 60
            while int(await redis.get(READY) or 0) < workers:
                if dead := [log for proc, log in zip(procs, logs, strict=True) if proc.poll() is not None]:
                    raise SystemExit(f"{peer} worker exited; its log: {dead[0]}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"{peer} workers not ready after 60 s; logs: {logs[0].parent}")
                await asyncio.sleep(0.1)
            for n in producers:
                async with PRODUCERS[peer](server.url, n) as call:
                    row = {"peer": peer, "workers": workers, **await measure(redis, call, n, seconds)}
                rows.append(row)
                on_row(row)
    finally:
        stop_workers(procs)
        server.stop()
    return rows


def print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['peer']:<8}{row['workers']:>8}{row['producers']:>10}{row['jobs_per_s']:>10.0f}"
        f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['redis_cpu_pct']:>8.0f}%"
        + (f"  ({row['errors']} errors, the first: {row['first_error']})" if row["errors"] else ""),
        flush=True,
    )


def main() -> None:
    if sys.argv[1:2] == ["_worker"]:  # a worker process started by spawn_worker
        WORKERS[sys.argv[2]](sys.argv[3])
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops workers and server
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", default="arq,celery,bullmq", help="comma-separated: arq, celery, bullmq")
    parser.add_argument("--producers", default="1,64,256", help="comma-separated producer counts")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per peer")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell (after 1 s warm-up)")
    parser.add_argument("--bullmq-concurrency", type=int, default=256, help="jobs at once per BullMQ worker")
    parser.add_argument("--json", type=Path, help="also write the rows and versions here")
    args = parser.parse_args()
    os.environ[BULLMQ_CONCURRENCY] = str(args.bullmq_concurrency)  # for the worker processes
    peers = [p for p in args.peers.split(",") if p]
    if unknown := set(peers) - set(WORKERS):
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    versions = {p: version(p) for p in peers}
    print(", ".join(f"{p} {v}" for p, v in versions.items()))
    print(f"{'peer':<8}{'workers':>8}{'producers':>10}{'jobs/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'Redis':>9}")
    producers = [int(n) for n in args.producers.split(",")]
    rows = []
    for peer in peers:
        rows += asyncio.run(bench_peer(peer, args.workers, producers, args.seconds, print_row))
    if args.json:
        config = {
            "arq_poll_s": ARQ_POLL_S,
            "celery_worker": CELERY_WORKER,
            "bullmq_concurrency": args.bullmq_concurrency,
        }
        out = {"versions": versions, "seconds": args.seconds, "warmup_s": WARMUP_S, "config": config, "rows": rows}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""What the benchmark scripts share: a throwaway embedded Redis and worker processes started as users do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from inferq.bench.server import temporary_server
from inferq.producer import InferenceClient
from inferq.producer.local import worker_argv
from inferq.shared.embedded import EmbeddedServer
from inferq.shared.keys import Keys
from inferq.shared.schemas import GenerationRequest, Timings
from inferq.shared.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent


def temp_server() -> tuple[EmbeddedServer, Path]:
    """A fresh valkey-server (AOF on) on a free port in a new temp dir: the bench never touches user data."""
    server = temporary_server()
    return server, server.dir.parent


def spawn_worker(
    url: str, prefix: str, name: str, args: list[str], log: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`inferq worker --consumer NAME ARGS...` in its own process group (so a kill takes its engine core too).
    INFERQ_BENCH_WORKER_PREFIX lets a profiler wrap it, e.g. "py-spy record -o w.txt --format raw --"."""
    wrap = os.environ.get("INFERQ_BENCH_WORKER_PREFIX", "").split()
    env = {**os.environ, "INFERQ_REDIS_URL": url, "INFERQ_KEY_PREFIX": prefix, **(extra_env or {})}
    cmd = [*wrap, *worker_argv(name, *args)]
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=fh, start_new_session=True)


async def wait_ready(redis: Redis, prefix: str, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the worker's heartbeat key exists (its engine is up and it reads)."""
    while not await redis.exists(Keys(prefix).worker(name)):
        if proc.poll() is not None:
            raise SystemExit(f"worker {name} exited with {proc.returncode}; its log: {log}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def one_worker(
    prefix: str, model: str, args: list[str], extra_env: dict[str, str] | None = None
) -> AsyncIterator[InferenceClient]:
    """A fresh server, one worker `w` on it (`--model MODEL ARGS...`), and a client once the worker reads.
    On exit the worker gets SIGINT (it drains as on SIGTERM; a profiler wrapping it saves on it), then its
    process group SIGKILL."""
    server, data = temp_server()
    log = data / "worker.log"
    worker = spawn_worker(server.url, prefix, "w", ["--model", model, *args], log, extra_env)
    try:
        async with InferenceClient(load_settings(redis_url=server.url, model=model, key_prefix=prefix)) as client:
            await wait_ready(client.redis, prefix, "w", worker, log)
            yield client
    finally:
        try:
            worker.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):  # the group kill below ends it
                worker.wait(timeout=60)
        finally:  # whatever is left of its group (an engine core of a worker that died) goes too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            server.stop()


@dataclass
class Trip:
    """One request as this client saw it (time.time()), with the worker's stored timings to set it against."""

    sent: float
    first: float | None  # its first token event arrived (None: none did)
    done: float  # its last event arrived
    timings: Timings


async def timed_request(client: InferenceClient, **request: Any) -> Trip:
    """Submit one request and stream it to its end."""
    sent = time.time()
    handle = await client.submit(**request)
    first = None
    async for _ in handle.tokens():
        first = first or time.time()
    done = time.time()
    return Trip(sent, first, done, (await handle.result()).timings)


async def first_event(client: InferenceClient, **request: Any) -> tuple[float | None, Timings]:
    """When (time.time()) the first token event of one request reached this client, and its stored timings."""
    trip = await timed_request(client, **request)
    return trip.first, trip.timings


_CHUNK = 2000  # requests per enqueue_many: a busy lane's submits, up to 256 a script call


async def admit_and_drain(client: InferenceClient, model: str, n: int) -> list[GenerationRequest]:
    """Admit `n` one-token, unstreamed requests for `model` in bulk (the producer waits on nothing), then wait
    until the model's streams are empty: every entry goes once its request has ended. Returns the requests."""
    built = [client.build_packed(prompt="capacity", model=model, max_tokens=1, stream=False) for _ in range(n)]
    for at in range(0, n, _CHUNK):
        chunk = built[at : at + _CHUNK]
        await client.enqueue_many([request for request, _ in chunk], packed=[payload for _, payload in chunk])
    streams = [stream for lanes in client.keys.all_queues(model) for stream in lanes]
    while sum([await client.redis.xlen(stream) for stream in streams]):  # noqa: ASYNC110 - only Redis knows
        await asyncio.sleep(0.02)
    return [request for request, _ in built]

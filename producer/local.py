"""A worker started for one command and stopped after it (`inferq bulk --local`): the one-command
equivalent of `vllm run-batch` on one machine. It runs as `inferq worker` in a child process, exactly as a
user would start it; this module only starts, watches and stops it (the producer never imports an engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from redis.asyncio import Redis

from shared.errors import InferqError
from shared.keys import Keys
from shared.settings import Settings


@contextlib.asynccontextmanager
async def local_worker(
    settings: Settings, redis: Redis, *, model: str, engine: str = "vllm", ready_timeout_s: float = 600.0
) -> AsyncIterator[str]:
    """Start `inferq worker` for `model` on the same Redis, wait until it is ready, yield its name; on exit
    SIGTERM it (it drains) and wait. Its log goes to a temp file, named in any error."""
    name = f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    log = Path(tempfile.mkstemp(prefix="inferq-local-worker-", suffix=".log")[1])
    env = {**os.environ, "INFERQ_KEY_PREFIX": settings.key_prefix}
    if settings.redis_url:
        env["INFERQ_REDIS_URL"] = settings.redis_url
    cmd = [sys.executable, "-m", "cli", "worker", "--model", model, "--consumer", name, "--engine", engine]
    proc = await asyncio.to_thread(_spawn, cmd, env, log)
    try:
        await _wait_ready(redis, Keys(settings.key_prefix).worker(name), proc, log, ready_timeout_s)
        yield name
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker and its engine core
                proc.wait()


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """In its own session, so a kill of the group takes its vLLM engine core too."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def _wait_ready(redis: Redis, key: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not await redis.exists(key):
        if proc.poll() is not None:
            raise InferqError(f"the local worker exited with {proc.returncode} before it was ready; its log: {log}")
        if loop.time() > give_up:
            raise InferqError(f"the local worker was not ready after {timeout_s:.0f}s; its log: {log}")
        await asyncio.sleep(0.2)

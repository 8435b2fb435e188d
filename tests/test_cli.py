"""`inferq` as a person uses it: text on stdout, stats on stderr, exit codes 0/1/2/3/4, help that teaches."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from inferq.producer.local import inferq_argv, worker_env
from inferq.shared.connection import embedded_server
from inferq.shared.embedded import EmbeddedServer, mimalloc_library
from inferq.shared.settings import Settings, load_settings
from tests.conftest import free_port

MODEL = "fake"


async def inferq(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, inferq_argv(*args), env=worker_env(settings, **env), capture_output=True, text=True, timeout=120
    )


async def test_submit_streams_text_to_stdout_and_stats_to_stderr(settings: Settings, start_worker) -> None:
    start_worker("--engine", "standin", "--model", MODEL)
    out = await inferq(settings, "submit", "--model", MODEL, "--prompt", "hi", "--max-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "t0 t1 t2 t3 \n"
    assert "[done" in out.stderr and "tokens in/out" in out.stderr

    as_json = await inferq(settings, "submit", "-m", MODEL, "-p", "hi", "--max-tokens", "2", "--json")
    record = json.loads(as_json.stdout)
    assert (record["status"], record["text"], record["usage"]["completion_tokens"]) == ("done", "t0 t1 ", 2)

    shown = await inferq(settings, "result", record["id"])
    assert shown.returncode == 0 and shown.stdout == "t0 t1 \n" and "status: done" in shown.stderr


async def test_exit_codes(settings: Settings, start_worker) -> None:
    usage = await inferq(settings, "submit", "--prompt", "x", "--max-tokens", "0")
    assert usage.returncode == 2 and "max_tokens" in usage.stderr

    timeout = await inferq(settings, "submit", "-m", "unserved", "-p", "x", "--timeout", "0.5")
    assert timeout.returncode == 4 and "did not finish within" in timeout.stderr
    assert "no live worker serves model 'unserved': start one with `inferq worker --model unserved`" in timeout.stderr

    full = await inferq(settings, "submit", "-m", "unserved", "-p", "x", "--timeout", "0.1", INFERQ_MAX_QUEUE_LEN="1")
    assert full.returncode == 3 and "is full" in full.stderr
    waited = await inferq(settings, "submit", "-m", "unserved", "-p", "x", "--wait", "0.3", INFERQ_MAX_QUEUE_LEN="1")
    assert waited.returncode == 3 and "is full" in waited.stderr and "is one running?" in waited.stderr

    start_worker("--engine", "standin", "--model", MODEL)
    failed = await inferq(settings, "submit", "-m", MODEL, "-p", "fail", "--raw")
    assert failed.returncode == 1 and "stand-in engine refuses" in failed.stderr

    missing = await inferq(settings, "result", "no-such-id")
    assert missing.returncode == 1 and "no request 'no-such-id'" in missing.stderr

    bad_env = await inferq(settings, "submit", "-p", "x", INFERQ_MAX_INFLIGHT="zero")
    assert bad_env.returncode == 2 and "INFERQ_" in bad_env.stderr


@pytest.mark.parametrize(
    "command", [[], ["submit"], ["worker"], ["redis"], ["models"], ["result"], ["cancel"], ["dlq"], ["dlq", "retry"]]
)
async def test_help_teaches(settings: Settings, command: list[str]) -> None:
    out = await inferq(settings, *command, "--help")
    assert out.returncode == 0 and "Usage:" in out.stdout
    assert len(out.stdout.splitlines()) > 5


async def test_worker_help_names_the_environment_variables(settings: Settings) -> None:
    # Square brackets in a help text are rich markup to typer ("[env X]" vanished from --help), and a long
    # word in the options table is cut short at 80 columns: the names belong in the description.
    out = await inferq(settings, "worker", "--help")
    for name in ("INFERQ_MAX_INFLIGHT", "INFERQ_MAX_MODEL_LEN", "INFERQ_STREAM_INTERVAL", "INFERQ_REDIS_URL"):
        assert name in out.stdout, name


async def test_redis_commands_manage_one_shared_server(tmp_path: Path, settings: Settings) -> None:
    env = {"INFERQ_REDIS_URL": "", "INFERQ_DATA_DIR": str(tmp_path), "INFERQ_EMBEDDED_PORT": str(free_port())}
    status = await inferq(settings, "redis", "status", **env)
    assert status.returncode == 1 and "not running" in status.stdout
    # Two starts racing: one server, the other reuses it.
    first, second = await asyncio.gather(
        inferq(settings, "redis", "start", **env), inferq(settings, "redis", "start", **env)
    )
    assert sorted([first.stdout.split(":")[0], second.stdout.split(":")[0]]) == ["already running", "started"]
    status = await inferq(settings, "redis", "status", **env)
    assert status.returncode == 0 and "running" in status.stdout
    assert (tmp_path / "redis" / "appendonlydir").is_dir()  # AOF on
    # Another data dir on the same port: each command says whose server it is, none claims it as its own.
    other = {**env, "INFERQ_DATA_DIR": str(tmp_path / "other")}
    for command in ("start", "status", "stop"):
        out = await inferq(settings, "redis", command, **other)
        assert out.returncode == 1, (command, out.stdout)
        assert f"its data is in {tmp_path / 'redis'}" in out.stderr and "INFERQ_EMBEDDED_PORT" in out.stderr
    stop = await inferq(settings, "redis", "stop", **env)
    assert stop.stdout.strip() == "stopped"
    assert (await inferq(settings, "redis", "status", **env)).returncode == 1


def test_embedded_server_reused_and_stopped(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path, free_port())
    assert server.start() is True
    pid = server.pid()
    assert server.start() is False and server.pid() == pid
    assert server.stop() is True and not server.ping()
    assert server.stop() is False


async def test_cancel_and_dead_letter_commands(settings: Settings, client, redis) -> None:  # type: ignore[no-untyped-def]
    from inferq.shared.keys import GROUP, Keys

    queued = await client.submit(prompt="not yet", model=MODEL, max_tokens=2)
    out = await inferq(settings, "cancel", queued.id)
    assert out.returncode == 0 and out.stdout == "cancelled\n"
    unknown = await inferq(settings, "cancel", "no-such-id")
    assert unknown.returncode == 1 and "no request 'no-such-id'" in unknown.stderr

    # Two dead letters, as a worker writes them: one retryable request, one undecodable payload.
    keys = Keys(settings.key_prefix)
    handle = await client.submit(prompt="retry me", model=MODEL, max_tokens=2, stream=False)
    [[_, [_cancelled, (entry_id, fields)]]] = await redis.xreadgroup(GROUP, "ghost", {keys.queue(MODEL): ">"})
    await redis.xack(keys.queue(MODEL), GROUP, entry_id)
    await redis.xdel(keys.queue(MODEL), entry_id)
    await redis.xadd(keys.dlq(MODEL), {"payload": fields[b"m"], "error": "boom", "deliveries": 4})
    await redis.xadd(keys.dlq(MODEL), {"payload": b"\xc1junk", "error": "undecodable", "deliveries": 1})
    await redis.hset(keys.result(handle.id), mapping={"status": "failed", "error": "boom"})

    listed = await inferq(settings, "dlq", "list", "-m", MODEL, "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["request_id"], r["deliveries"], r["error"]) for r in rows] == [
        (handle.id, 4, "boom"),
        (None, 1, "undecodable"),
    ]
    shown = await inferq(settings, "dlq", "show", rows[0]["id"], "-m", MODEL)
    assert json.loads(shown.stdout)["request"]["prompt"] == "retry me"

    junk = await inferq(settings, "dlq", "retry", rows[1]["id"], "-m", MODEL)
    assert junk.returncode == 2 and "cannot be retried" in junk.stderr
    retried = await inferq(settings, "dlq", "retry", rows[0]["id"], "-m", MODEL)
    assert retried.returncode == 0 and retried.stdout == f"re-enqueued {handle.id}\n"
    assert (await client.get(handle.id)).status == "queued"
    assert await redis.xlen(keys.queue(MODEL)) == 2  # the cancelled entry (still ghost's) + the retried one

    refused = await inferq(settings, "dlq", "purge", "-m", MODEL)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    purged = await inferq(settings, "dlq", "purge", "-m", MODEL, "--yes")
    assert purged.returncode == 0 and "purged 1 dead letters" in purged.stdout
    assert await redis.xlen(keys.dlq(MODEL)) == 0


def test_bench_without_its_extra_says_how_to_get_it() -> None:
    """The harness's dependencies come with the `bench` extra; without them every other command works and
    `inferq bench ...` says what to install (here psutil is made unimportable)."""
    code = "import sys; sys.modules['psutil'] = None; from inferq.cli import app; app(sys.argv[1:])"
    for args in (["bench", "online", "--target", "direct"], ["bench"]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert "pip install 'inferq[bench]'" in out.stderr and "psutil" in out.stderr
    listed = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "submit" in listed.stdout and "bench" in listed.stdout


def test_the_embedded_server_can_fsync_every_write(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path, free_port(), fsync="always")
    assert server.start() is True
    try:
        assert server._ask("CONFIG", "GET", "appendfsync") == [b"appendfsync", b"always"]
    finally:
        server.stop()
    default = EmbeddedServer(tmp_path / "default", free_port())
    assert default.start() is True
    try:
        assert default._ask("CONFIG", "GET", "appendfsync") == [b"appendfsync", b"everysec"]
    finally:
        default.stop()


@pytest.mark.skipif(mimalloc_library() is None, reason="no cmeel-mimalloc here (the `embedded` extra, Linux only)")
def test_the_embedded_server_runs_with_mimalloc_unless_told_otherwise(tmp_path: Path) -> None:
    """The packaged valkey-server is built with glibc's malloc; ours preloads mimalloc into it (and keeps a
    preload of the user's behind it), and INFERQ_EMBEDDED_MALLOC=libc leaves the binary as it is."""

    def mapped(server: EmbeddedServer) -> str:
        return Path(f"/proc/{server.pid()}/maps").read_text()

    server = EmbeddedServer(tmp_path / "mimalloc", free_port())
    assert server.start() is True
    try:
        assert "libmimalloc" in mapped(server) and server.allocator() == "mimalloc"
        assert server._ask("SET", "k", "v") is True and server._ask("GET", "k") == b"v"
    finally:
        server.stop()
    told = load_settings(data_dir=tmp_path / "libc", embedded_port=free_port(), embedded_malloc="libc")
    libc = embedded_server(told)  # what a command started with INFERQ_EMBEDDED_MALLOC=libc runs
    assert libc.start() is True
    try:
        assert "libmimalloc" not in mapped(libc) and libc.allocator() == "libc"
    finally:
        libc.stop()

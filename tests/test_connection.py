"""How inferq connects: a server that never answers a connect is given up on in seconds with one line (no
traceback, no password), and a unix-socket URL works like a TCP one (real servers, real sockets)."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import DataError

from inferq.producer import InferenceClient
from inferq.producer.local import inferq_argv
from inferq.shared.connection import _HiredisPacking, connect
from inferq.shared.embedded import valkey_binary
from inferq.shared.settings import Settings
from tests.conftest import MODELS_DIR


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port whose listener never accepts and whose backlog is full: the kernel drops every new SYN, as a
    firewall or a host gone from the network would, so a connect waits until it gives up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    queued = []
    for _ in range(4):
        conn = socket.socket()
        conn.setblocking(False)
        conn.connect_ex(("127.0.0.1", port))
        queued.append(conn)
    yield port
    for conn in queued:
        conn.close()
    listener.close()


def test_a_server_that_never_answers_is_one_line_in_seconds(black_hole: int) -> None:
    env = {**os.environ, "INFERQ_REDIS_URL": f"redis://:hunter2@127.0.0.1:{black_hole}/0"}
    # Without a connect timeout this waits out the kernel's SYN retries (about two minutes).
    done = subprocess.run(inferq_argv("status"), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 5, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Timeout connecting" in done.stderr and "INFERQ_REDIS_URL" in done.stderr
    assert "hunter2" not in done.stdout + done.stderr


@pytest.fixture
def unix_socket_server() -> Iterator[str]:
    """The embedded server's binary listening on a unix socket only."""
    folder = Path(tempfile.mkdtemp(prefix="iq", dir="/tmp"))  # a socket path must be short
    path = folder / "v.sock"
    proc = subprocess.Popen(
        [valkey_binary(), "--port", "0", "--unixsocket", str(path), "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    give_up = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < give_up, "valkey did not open its unix socket"
        time.sleep(0.05)
    yield f"unix://{path}?db=0"
    proc.kill()
    proc.wait()


async def test_a_unix_socket_url_carries_a_request_to_its_result(unix_socket_server: str, start_worker) -> None:
    settings = Settings(redis_url=unix_socket_server, key_prefix="unix", data_dir=MODELS_DIR, model="fake")
    start_worker("--engine", "standin", "--model", "fake", cfg=settings)
    async with InferenceClient(settings) as client:
        handle = await client.submit(prompt="hi", model="fake", max_tokens=3)
        assert "".join([event.text async for event in handle.tokens()]) == "t0 t1 t2 "
        assert (await client.get(handle.id)).status == "done"


async def test_commands_packed_by_hiredis_reach_the_server_as_redis_py_would_send_them(settings: Settings) -> None:
    redis = connect(settings)
    try:
        assert issubclass(redis.connection_pool.connection_class, _HiredisPacking)
        key = f"{settings.key_prefix}:packing"
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"text": "héllo ✓", "float": 1.5, "int": 3, "bytes": b"\x00\xff"})
            pipe.expire(key, 60)
            pipe.execute_command("CONFIG GET", "maxmemory")  # a subcommand given with its command, split
            stored, expiring, config = await pipe.execute()
        assert (stored, expiring, list(config)) == (4, True, ["maxmemory"])
        stored_fields = {b"text": "héllo ✓".encode(), b"float": b"1.5", b"int": b"3", b"bytes": b"\x00\xff"}
        assert await redis.hgetall(key) == stored_fields
        with pytest.raises(DataError):  # as redis-py's own packing refuses it
            await redis.set(key, None)  # type: ignore[arg-type]
    finally:
        await redis.aclose()

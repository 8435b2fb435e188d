"""Redis roles that work (docs/CONTRACTS.md, "Roles"): a real server started with an ACL file written by
`inferq redis acl`, a worker and an ops user scoped to the prefix, and producers bound to one tenant each.
A producer submits, streams, reads and cancels its own requests, and can read no queue entry, no other
tenant's result or tokens, no worker key; a forged cancel broadcast stops nothing; a detached bulk job runs
to its end under the prefix-scoped users."""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from inferq.producer import InferenceClient
from inferq.producer.bulk.detached import BulkJobs
from inferq.producer.bulk.state import COMPLETED
from inferq.producer.local import inferq_argv
from inferq.shared.embedded import valkey_binary
from inferq.shared.errors import InvalidRequest, PermissionDenied
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings
from tests.conftest import MODELS_DIR, free_port, wait_until
from tests.test_bulk import write_lines
from tests.test_bulk_detached import FAST_STEPS, job_where

PREFIX, MODEL, PASSWORD = "iq", "fake", "s3cret-pw"
USERS = {"w": ("worker", None), "ops": ("ops", None), "acme": ("producer", "acme"), "bolt": ("producer", "bolt")}


@dataclass
class AclServer:
    port: int

    def url(self, user: str) -> str:
        return f"redis://{user}:{PASSWORD}@127.0.0.1:{self.port}/0"

    def settings(self, user: str) -> Settings:
        tenant = USERS[user][1]
        return Settings(
            redis_url=self.url(user), key_prefix=PREFIX, data_dir=MODELS_DIR, model=MODEL, tenant=tenant,
            request_timeout_s=60,
        )  # fmt: skip


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[AclServer]:
    lines = ["user default off"]
    env = {**os.environ, "INFERQ_KEY_PREFIX": PREFIX, "INFERQ_ACL_PASSWORD": PASSWORD}
    for user, (role, tenant) in USERS.items():
        args = ["redis", "acl", role, "--user", user, *(["--tenant", tenant] if tenant else [])]
        printed = subprocess.run(inferq_argv(*args), env=env, capture_output=True, text=True, check=True).stdout
        assert PASSWORD not in printed  # only its SHA-256
        lines.append(printed.strip())
    aclfile = tmp_path / "users.acl"
    aclfile.write_text("\n".join(lines) + "\n")
    port = free_port()
    proc = subprocess.Popen(
        [valkey_binary(), "--port", str(port), "--bind", "127.0.0.1", "--aclfile", str(aclfile), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server = AclServer(port)
    try:
        import redis

        probe = redis.Redis.from_url(server.url("ops"))
        wait_until_sync(lambda: _answers(probe), proc)
        yield server
    finally:
        proc.kill()
        proc.wait()


def _answers(client) -> bool:  # type: ignore[no-untyped-def]
    try:
        return bool(client.ping())
    except Exception:
        return False


def wait_until_sync(check, proc: subprocess.Popen[bytes]) -> None:  # type: ignore[no-untyped-def]
    import time

    give_up = time.monotonic() + 30
    while not check():
        assert proc.poll() is None and time.monotonic() < give_up, "the ACL server did not start"
        time.sleep(0.05)


@pytest.fixture
async def producers(acl_server: AclServer) -> AsyncIterator[tuple[InferenceClient, InferenceClient]]:
    async with (
        InferenceClient(acl_server.settings("acme")) as acme,
        InferenceClient(acl_server.settings("bolt")) as bolt,
    ):
        yield acme, bolt


async def test_producers_serve_their_own_tenant_and_read_no_one_elses(
    acl_server: AclServer, producers: tuple[InferenceClient, InferenceClient], start_worker
) -> None:
    acme, bolt = producers
    start_worker("--engine", "standin", "--model", MODEL, cfg=acl_server.settings("w"))
    mine = await acme.submit(prompt="hi", model=MODEL, max_tokens=3)
    assert mine.id.startswith("acme:") and acme.channel.startswith(f"{PREFIX}:t:acme:")
    assert "".join([event.text async for event in mine.tokens()]) == "t0 t1 t2 "
    assert (await acme.get(mine.id)).status == "done"
    theirs = await bolt.generate(prompt="hi", model=MODEL, max_tokens=2)
    assert theirs.status == "done"

    with pytest.raises(PermissionDenied, match="may not read request"):
        await bolt.get(mine.id)
    with pytest.raises(PermissionDenied, match="may not cancel"):
        await bolt.cancel(mine.id)
    with pytest.raises(InvalidRequest, match="INFERQ_TENANT"):
        await acme.submit(prompt="hi", model=MODEL, tenant="bolt")
    with pytest.raises(InvalidRequest, match="must start with 'acme:'"):
        await acme.submit(prompt="hi", model=MODEL, request_id="bolt:1")
    keys = Keys(PREFIX)
    refused = [
        ("XRANGE", keys.queue(MODEL), "-", "+"),  # nobody else's prompt
        ("HGETALL", keys.result(theirs.id)),  # nor result
        ("HSET", keys.worker("w0"), "slots", "0"),  # nor worker key
        ("XADD", keys.dlq(MODEL), "*", "m", "x"),
        ("SCAN", "0"),  # nor the names of keys
        ("SUBSCRIBE", keys.tokens("bolt:x")),  # nor another tenant's tokens
        ("SET", "elsewhere", "1"),
    ]
    async with Redis.from_url(acl_server.url("acme")) as raw:
        for command in refused:
            with pytest.raises(NoPermissionError):
                await raw.execute_command(*command)
    with pytest.raises(PermissionDenied, match="ops role"):
        await acme.stats()
    with pytest.raises(PermissionDenied, match="ops role"):
        await acme.dead_letters(MODEL).list()
    env = {**os.environ, "INFERQ_REDIS_URL": acl_server.url("acme"), "INFERQ_KEY_PREFIX": PREFIX}
    for argv, hint in ((("status",), "ops role"), (("submit", "--prompt", "hi", "--model", MODEL), "INFERQ_TENANT")):
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=60, env=env)
        done = await asyncio.to_thread(run, inferq_argv(*argv))  # a submit without INFERQ_TENANT: refused at once
        assert (done.returncode, done.stderr.count("\n")) == (6, 1) and hint in done.stderr, done.stderr
    wrong = acl_server.settings("acme").model_copy(update={"redis_url": acl_server.url("acme").replace(PASSWORD, "x")})
    with pytest.raises(PermissionDenied, match="refused the user"):
        async with InferenceClient(wrong):
            pass
    async with Redis.from_url(acl_server.url("w")) as worker_user:
        with pytest.raises(NoPermissionError):
            await worker_user.set("elsewhere", "1")  # a worker writes only under the prefix


async def test_a_forged_cancel_broadcast_stops_nothing(
    acl_server: AclServer, producers: tuple[InferenceClient, InferenceClient], start_worker
) -> None:
    """Any producer may publish on the cancel channel (cancel.lua does), so the broadcast only says "look":
    the worker cancels a request only if its result carries the cancel mark, which only its tenant can set."""
    acme, bolt = producers
    start_worker("--engine", "standin", "--model", MODEL, cfg=acl_server.settings("w"))
    victim = await bolt.submit(prompt="hang", model=MODEL)
    own = await acme.submit(prompt="hang", model=MODEL)
    for client, handle in ((bolt, victim), (acme, own)):
        await wait_until(lambda c=client, h=handle: _running(c, h.id), 30, "the hung request to start")
    await acme.redis.publish(Keys(PREFIX).cancel(), victim.id)  # forged: bolt's request, no mark
    assert await own.cancel() == "running"  # a real cancel, broadcast after the forged one
    assert (await own.result(timeout=30)).status == "cancelled"
    assert (await bolt.get(victim.id)).status == "running"  # the forged broadcast was checked and ignored
    assert await victim.cancel() == "running"
    assert (await victim.result(timeout=30)).status == "cancelled"


async def _running(client: InferenceClient, request_id: str) -> bool:
    return (await client.get(request_id)).status == "running"


async def test_a_detached_bulk_job_runs_under_prefix_scoped_users(
    acl_server: AclServer, start_worker, tmp_path: Path
) -> None:
    start_worker("--engine", "standin", "--model", MODEL, cfg=acl_server.settings("w"), env=FAST_STEPS)
    path = tmp_path / "in.jsonl"
    write_lines(path, [{"custom_id": f"c{i}", "prompt": "x", "max_tokens": 2} for i in range(12)])
    async with InferenceClient(acl_server.settings("ops")) as ops:
        jobs = BulkJobs(ops)
        job = await jobs.submit(path, model=MODEL)
        ended = await job_where(jobs, job.id, lambda j: j.state == COMPLETED, "the job to end")
        assert (ended.done, ended.failed) == (12, 0)
        _, lines = await jobs.download(job.id, tmp_path / "out.jsonl")
        assert lines == 12

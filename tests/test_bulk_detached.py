"""Detached bulk jobs (arq): submit, status, list, cancel, download; a job whose runner is SIGKILLed halfway
is taken over by another runner and ends with every line accounted for once, on real vLLM."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.producer.bulk.detached import BulkJobs
from inferq.producer.bulk.state import CANCELLED, CANCELLING, COMPLETED, JobRecord
from inferq.producer.local import inferq_argv
from inferq.shared.embedded import EmbeddedServer
from inferq.shared.errors import InferqError
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings
from tests.conftest import WorkerProcess, drained, free_port, wait_until
from tests.test_bulk import chat, read_lines, write_lines

FAST_STEPS = {"INFERQ_BULK_SLICE_S": "1", "INFERQ_BULK_WINDOW": "8"}  # quick takeover, a slow feed


def runner(settings: Settings, tmp_path: Path, name: str) -> WorkerProcess:
    return WorkerProcess(
        settings, name=name, log_path=tmp_path / f"{name}.log", env=FAST_STEPS, command=("bulk", "runner")
    )


async def job_where(jobs: BulkJobs, job_id: str, check, what: str, timeout_s: float = 120) -> JobRecord:  # type: ignore[no-untyped-def]
    async def ok() -> bool:
        return bool(check(await jobs.get(job_id)))

    await wait_until(ok, timeout_s, what)
    return await jobs.get(job_id)


async def test_detached_job_survives_its_runner_being_killed(tiny_worker: WorkerProcess, tmp_path: Path) -> None:
    settings = tiny_worker.settings
    runners = [runner(settings, tmp_path, f"runner-{i}") for i in range(2)]
    path = tmp_path / "in.jsonl"
    lines: list[object] = [
        chat(f"q{i}", f"Question {i}?", model="tiny", max_tokens=12, temperature=0) for i in range(300)
    ]
    lines[10:10] = ["{broken", chat("q5", "a duplicate custom_id", model="tiny")]
    write_lines(path, lines)
    async with InferenceClient(settings) as client:
        jobs = BulkJobs(client)
        job = await jobs.submit(path, model="tiny")
        assert (job.state, job.total) == ("validating", 302)
        running = await job_where(jobs, job.id, lambda j: j.accounted >= 30 and j.runner, "the job to be half run")
        assert running.state == "in_progress" and running.accounted < running.total
        victim = next(r for r in runners if running.runner.endswith(f"-{r.proc.pid}"))
        victim.kill()  # SIGKILL mid-step: its lease and its arq step are left to lapse
        ended = await job_where(jobs, job.id, lambda j: j.state == COMPLETED, "another runner to finish the job", 180)
        assert ended.runner != running.runner
        assert (ended.total, ended.done, ended.invalid, ended.failed) == (302, 300, 2, 0)
        out = tmp_path / "out.jsonl"
        proc = await asyncio.to_thread(
            subprocess.run,
            inferq_argv("bulk", "download", job.id, "-o", str(out)),
            env={**os.environ, "INFERQ_REDIS_URL": settings.redis_url or "", "INFERQ_KEY_PREFIX": settings.key_prefix},
            capture_output=True,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        records = read_lines(out)
        ids = [r["custom_id"] for r in records]
        assert len(records) == 302 and sorted(set(ids)) == sorted({f"q{i}" for i in range(300)} | {"line-11"})
        assert ids.count("q5") == 2  # the first q5's answer and the duplicate's error record
        answered = [r for r in records if r["error"] is None]
        assert len(answered) == 300 and all(r["response"]["body"]["usage"]["completion_tokens"] == 12 for r in answered)  # type: ignore[index]
        # Nothing ran twice: the runner fed and counted; the vLLM worker ran each request once.
        keys = Keys(settings.key_prefix)
        for record in answered[:50]:
            assert await client.redis.hget(keys.result(str(record["response"]["request_id"])), "attempts") == b"1"  # type: ignore[index]
        assert not await client.redis.exists(keys.bulk_input(job.id), keys.bulk_ids(job.id))  # cleaned up
        assert await drained(client.redis, settings, "tiny") == (0, 0)
    survivor = next(r for r in runners if r is not victim)
    assert survivor.stop() == 0, survivor.log()[-3000:]


async def test_status_list_cancel_and_download(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker, tmp_path: Path
) -> None:
    start_worker("--engine", "standin", "--model", "fake", "--max-inflight", "4", env=FAST_STEPS)
    path = tmp_path / "in.jsonl"
    write_lines(path, [{"custom_id": f"c{i}", "prompt": f"p{i}", "max_tokens": 100} for i in range(200)])
    jobs = BulkJobs(client)
    job = await jobs.submit(path, model="fake")
    assert (await jobs.list())[0].id == job.id  # newest first
    await job_where(jobs, job.id, lambda j: j.accounted >= 8, "some lines to finish")
    with pytest.raises(InferqError, match="download it when it has ended, or pass --wait"):
        await jobs.download(job.id, tmp_path / "early.jsonl")
    assert await jobs.cancel(job.id) == CANCELLING
    ended = await job_where(jobs, job.id, lambda j: j.state == CANCELLED, "the cancel to complete")
    assert ended.accounted < ended.total == 200  # unfed lines never ran
    assert await jobs.cancel(job.id) == CANCELLED  # ended: a second cancel changes nothing
    out = tmp_path / "out.jsonl"
    record, lines = await jobs.download(job.id, out)
    records = read_lines(out)
    assert lines == len(records) == ended.accounted and record.state == CANCELLED
    assert len({r["custom_id"] for r in records}) == len(records)
    done = [r for r in records if r["error"] is None]
    assert len(done) == ended.done >= 8 and all(r["text"] == "".join(f"t{i} " for i in range(100)) for r in done)
    assert all("cancelled" in str(r["error"]) for r in records if r["error"] is not None)
    status = json.loads(json.dumps(ended.to_dict()))
    assert status["state"] == "cancelled" and status["accounted"] == ended.accounted
    # A second download of the same file adds nothing; it ends where the first did.
    assert (await jobs.download(job.id, out))[1] == lines and len(read_lines(out)) == lines
    assert await drained(redis, settings, "fake") == (0, 0)
    # arq's own keys (here the kept results of the job's steps) are under the prefix too; none under `arq:`.
    steps = [k async for k in redis.scan_iter(match=f"{settings.key_prefix}:arq:result:*")]
    assert steps and all(k.decode().endswith(tuple(f":step:{n}" for n in range(1000))) for k in steps)
    assert [k async for k in redis.scan_iter(match="arq:*")] == []


async def test_a_dropped_redis_connection_does_not_stop_a_detached_job(
    settings: Settings, start_worker, tmp_path: Path
) -> None:
    """Every client connection killed mid-job (CLIENT KILL, on a server of this test's own): the step that
    lost its connection is retried and the job completes, nothing stuck in in_progress."""
    server = EmbeddedServer(tmp_path / "own-redis", free_port())
    server.start()
    cfg = settings.merged(redis_url=server.url)
    try:
        start_worker("--engine", "standin", "--model", "fake", "--max-inflight", "4", cfg=cfg, env=FAST_STEPS)
        path = tmp_path / "in.jsonl"
        write_lines(path, [{"custom_id": f"c{i}", "prompt": f"p{i}", "max_tokens": 100} for i in range(40)])
        async with InferenceClient(cfg) as client:
            job = await BulkJobs(client).submit(path, model="fake")
            await job_where(BulkJobs(client), job.id, lambda j: j.accounted >= 4, "some lines to finish")
        async with Redis.from_url(server.url) as admin:
            assert int(await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")) > 0
        async with InferenceClient(cfg) as client:
            done = await job_where(BulkJobs(client), job.id, lambda j: j.state == COMPLETED, "the job to end", 120)
        assert (done.total, done.done, done.failed, done.invalid) == (40, 40, 0, 0)
    finally:
        server.stop()

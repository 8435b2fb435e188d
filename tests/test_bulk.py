"""Attached bulk jobs: both line formats end to end, bad lines and duplicate custom_ids accounted for, a
killed job resumed without running anything twice, and OpenAI chat lines on real vLLM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.producer.bulk.attached import BulkJob
from inferq.producer.local import inferq_argv
from inferq.shared.errors import InvalidRequest
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings
from tests.conftest import WorkerProcess, drained, wait_until, with_children_gone

MODEL = "fake"


def chat(custom_id: str, text: str, model: str = MODEL, **body: object) -> dict[str, object]:
    return {
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 2, **body},
    }  # fmt: skip


def write_lines(path: Path, lines: list[object]) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_both_formats_with_bad_lines_every_line_accounted_for(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker, tmp_path: Path
) -> None:
    start_worker("--engine", "standin", "--model", MODEL)
    simple = tmp_path / "simple.jsonl"
    write_lines(simple, [
        *({"custom_id": f"s{i}", "prompt": f"line {i}", "max_tokens": 3} for i in range(5)),
        "{not json",
        {"custom_id": "bad-field", "prompt": "x", "colour": "red"},
        {"custom_id": "s1", "prompt": "duplicate", "max_tokens": 3},
        {"custom_id": "too-many", "prompt": "x", "max_tokens": 10**7},
        {"prompt": "no custom_id: the line number stands in", "max_tokens": 1},
    ])  # fmt: skip
    out = tmp_path / "simple.out.jsonl"
    job = BulkJob(client, simple, out, model=MODEL)
    progress = await job.run()
    assert (progress.total, progress.done, progress.invalid, progress.failed) == (10, 6, 4, 0)
    records = read_lines(out)
    assert len(records) == 10
    ok = {r["custom_id"]: r for r in records if r["error"] is None}
    assert sorted(ok) == ["line-10", "s0", "s1", "s2", "s3", "s4"]
    assert ok["s2"]["text"] == "t0 t1 t2 " and ok["s2"]["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
    }  # fmt: skip
    errors = [str(r["error"]) for r in records if r["error"] is not None]
    assert any("line 6 is not JSON" in e for e in errors)
    assert any("unknown field(s) colour" in e for e in errors)
    assert any("duplicate custom_id 's1' (first on line 2)" in e for e in errors)
    assert any("max_tokens=10000000 is above the limit" in e for e in errors)
    assert not await redis.exists(Keys(settings.key_prefix).done(job.id))  # the reply stream is cleaned up

    batch = tmp_path / "openai.jsonl"
    write_lines(batch, [
        chat("c1", "Hi"), chat("c2", "Hello", max_completion_tokens=3),
        {"custom_id": "t1", "method": "POST", "url": "/v1/completions",
         "body": {"model": MODEL, "prompt": "Once", "max_tokens": 2}},
        {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings", "body": {"model": MODEL, "input": "x"}},
        "not json at all",
        "[1, 2]",
    ])  # fmt: skip
    out = tmp_path / "openai.out.jsonl"
    await BulkJob(client, batch, out, model=MODEL).run()
    records = read_lines(out)
    # One shape for every record of the file, the lines that are not even JSON included.
    assert len(records) == 6 and all(set(r) == {"id", "custom_id", "response", "error"} for r in records)
    by_id = {r["custom_id"]: r for r in records}
    assert by_id["line-5"]["response"]["status_code"] == 400  # type: ignore[index]
    assert "line 5 is not JSON" in by_id["line-5"]["error"]["message"]  # type: ignore[index]
    assert "line 6 is a JSON list" in by_id["line-6"]["error"]["message"]  # type: ignore[index]
    assert by_id["c2"]["response"]["body"]["choices"][0]["message"]["content"] == "t0 t1 t2 "  # type: ignore[index]
    assert by_id["c1"]["response"]["body"]["object"] == "chat.completion"  # type: ignore[index]
    assert by_id["t1"]["response"]["body"]["choices"][0]["text"] == "t0 t1 "  # type: ignore[index]
    assert by_id["e1"]["response"]["status_code"] == 400 and "not supported" in by_id["e1"]["error"]["message"]  # type: ignore[index]
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_strict_refuses_the_file_and_enqueues_nothing(
    client: InferenceClient, settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    path = tmp_path / "in.jsonl"
    write_lines(path, [{"custom_id": "a", "prompt": "x"}, "oops", {"custom_id": "a", "prompt": "y"}])
    with pytest.raises(InvalidRequest) as refused:
        await BulkJob(client, path, tmp_path / "out.jsonl", model=MODEL, strict=True).run()
    message = str(refused.value)
    assert "2 bad line(s)" in message and "line 2 is not JSON" in message and "duplicate custom_id 'a'" in message
    assert not await redis.exists(Keys(settings.key_prefix).queue(MODEL))


def bulk_process(settings: Settings, *args: str, **extra_env: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "INFERQ_REDIS_URL": settings.redis_url or "", "INFERQ_KEY_PREFIX": settings.key_prefix}
    env.update(extra_env)  # a --local worker inherits it too
    return subprocess.Popen(inferq_argv("bulk", *args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def test_killed_job_resumes_without_running_anything_twice(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker, tmp_path: Path
) -> None:
    start_worker("--engine", "standin", "--model", MODEL, "--max-inflight", "4")
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(path, [{"custom_id": f"r{i}", "prompt": f"p{i}", "max_tokens": 150} for i in range(40)])
    first = bulk_process(settings, str(path), "-o", str(out), "-m", MODEL)

    async def some_written() -> bool:
        return out.exists() and len(out.read_text().splitlines()) >= 8

    await wait_until(some_written, 60, "the first run to write some results")
    assert first.poll() is None, "the first run must still be going when it is killed"
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = bulk_process(settings, str(path), "-o", str(out), "-m", MODEL)
    _, err = await asyncio.to_thread(second.communicate, timeout=120)
    assert second.returncode == 0, err.decode()
    records = read_lines(out)
    assert sorted(r["custom_id"] for r in records) == sorted(f"r{i}" for i in range(40))  # each exactly once
    keys = Keys(settings.key_prefix)
    for record in records:
        assert record["error"] is None and record["text"] == "".join(f"t{i} " for i in range(150))
    # No request ran twice: every stored result was started once and ended once.
    results = [key async for key in redis.scan_iter(match=keys.result("bulk-*"))]
    assert len(results) == 40
    for key in results:
        assert await redis.hget(key, "attempts") == b"1" and await redis.hget(key, "duplicates") is None
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_openai_chat_lines_on_vllm(tiny_worker: WorkerProcess, tmp_path: Path) -> None:
    settings = tiny_worker.settings
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(path, [chat(f"q{i}", f"Question {i}?", model="tiny", max_tokens=6, temperature=0) for i in range(8)])
    async with InferenceClient(settings) as client:
        progress = await BulkJob(client, path, out, model="tiny").run()
    assert (progress.done, progress.failed) == (8, 0)
    for record in read_lines(out):
        body = record["response"]["body"]  # type: ignore[index]
        assert body["model"] == "tiny" and body["usage"]["completion_tokens"] == 6  # type: ignore[index]
        assert body["choices"][0]["message"]["content"]  # type: ignore[index]


async def test_local_mode_starts_and_stops_its_own_worker(settings: Settings, redis: Redis, tmp_path: Path) -> None:
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(path, [{"custom_id": f"l{i}", "prompt": f"p{i}", "max_tokens": 2} for i in range(12)])
    proc = bulk_process(settings, str(path), "-o", str(out), "-m", MODEL, "--local", "--engine", "standin")
    _, err = await asyncio.to_thread(proc.communicate, timeout=180)
    assert proc.returncode == 0, err.decode()
    assert sorted(r["custom_id"] for r in read_lines(out)) == sorted(f"l{i}" for i in range(12))
    keys = Keys(settings.key_prefix)
    assert [k async for k in redis.scan_iter(match=keys.workers_pattern())] == []  # its worker is gone
    assert await drained(redis, settings, MODEL) == (0, 0)


def running_with(marker: str) -> list[int]:
    """The pids of running processes whose command line contains `marker`."""
    return [p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or ())]


async def test_local_job_stopped_by_sigterm_takes_its_worker_and_resumes(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    """SIGTERM to `bulk --local` stops it as Ctrl-C does: its worker (in a session of its own, beyond the
    reach of a kill of the job's group) is stopped, not orphaned; the same command then finishes the job."""
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(path, [{"custom_id": f"t{i}", "prompt": f"p{i}", "max_tokens": 1000} for i in range(12)])
    local = (str(path), "-o", str(out), "-m", MODEL, "--local", "--engine", "standin")
    # Two at a time, ~1 s per pair: the job is still going when it is stopped.
    proc = bulk_process(settings, *local, INFERQ_MAX_INFLIGHT="2")
    marker = f"local-{proc.pid}-"
    try:

        async def some_written() -> bool:
            return out.exists() and len(out.read_text().splitlines()) >= 2

        await wait_until(some_written, 120, "the job to write some results")
        assert proc.poll() is None, "the job must still be going when it is stopped"
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=180)
        assert proc.returncode == 128 + signal.SIGTERM, err.decode()
        assert running_with(marker) == [], "the local worker outlived its job"
        keys = Keys(settings.key_prefix)
        assert [k async for k in redis.scan_iter(match=keys.workers_pattern())] == []  # it drained and left
        assert 2 <= len(read_lines(out)) < 12  # stopped part way
    finally:
        proc.kill()
        for pid in running_with(marker):  # only if the test failed: an orphan must not outlive the suite
            with_children_gone(pid)
    again = bulk_process(settings, *local)
    _, err = await asyncio.to_thread(again.communicate, timeout=180)
    assert again.returncode == 0, err.decode()
    assert sorted(r["custom_id"] for r in read_lines(out)) == sorted(f"t{i}" for i in range(12))  # each once
    assert await drained(redis, settings, MODEL) == (0, 0)

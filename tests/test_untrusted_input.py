"""What a client sends is input, not instructions: limits refused with the limit's name at the producer
and again at the worker, one bad request never fails its neighbours, and a worker writes only to reply
targets that are inferq's own of the right kind (stand-in engine, real Redis)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.shared.codec import pack, unpack
from inferq.shared.embedded import EmbeddedServer
from inferq.shared.errors import InferqError, InvalidRequest
from inferq.shared.keys import GROUP, Keys, bulk_request_id
from inferq.shared.settings import Settings
from tests.conftest import WorkerProcess, drained, free_port, wait_until
from tests.test_cli import inferq

MODEL = "fake"


@pytest.mark.parametrize(
    ("request_fields", "named"),
    [
        ({"prompt": "x" * (1 << 20)}, "INFERQ_MAX_REQUEST_BYTES"),
        ({"messages": [{"role": "user", "content": "hi"}] * 300}, "INFERQ_MAX_MESSAGES"),
        ({"prompt": "hi", "stop": ["s" * 5000]}, "INFERQ_MAX_STOP_CHARS"),
        ({"prompt": "hi", "max_tokens": 10**6}, "INFERQ_MAX_TOKENS_LIMIT"),
        ({"prompt": "hi", "model": "x:*:high"}, "model"),
        ({"prompt": "hi", "model": "m" * 100_000}, "model"),
        ({"prompt": "hi", "reply_stream": "otherapp:events"}, "reply_stream"),
        ({"prompt": "hi", "ttl": math.nan}, "ttl"),
        ({"prompt": "hi", "ttl": "soon"}, "ttl"),
        ({"prompt": "hi", "deadline": math.inf}, "deadline"),
        ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "  "}]}, "empty"),
        ({"prompt": "lone \ud800 surrogate"}, "Unicode"),
    ],
)
async def test_the_producer_refuses_what_breaks_a_limit_naming_it(
    client: InferenceClient, redis: Redis, settings: Settings, request_fields: dict[str, object], named: str
) -> None:
    fields = {"model": MODEL, **request_fields}
    with pytest.raises(InvalidRequest) as refused:
        await client.submit(**fields)  # type: ignore[arg-type]
    assert isinstance(refused.value, InferqError)
    message = str(refused.value)
    assert named in message and len(message) < 400  # says which limit, and never echoes the input back
    assert await redis.xlen(Keys(settings.key_prefix).queue(MODEL)) == 0


async def test_a_reply_stream_takes_only_its_own_jobs_requests(client: InferenceClient, settings: Settings) -> None:
    keys = Keys(settings.key_prefix)
    with pytest.raises(InvalidRequest, match="reply_stream"):
        await client.submit(
            prompt="hi", model=MODEL, reply_stream=keys.done("job-b"), request_id=bulk_request_id("job-a", 0, "x")
        )
    # Without a request id, one that belongs to the stream's job is given.
    handle = await client.submit(prompt="hi", model=MODEL, reply_stream=keys.done("job-b"), stream=False)
    assert handle.id.startswith("bulk-job-b-0-")


async def test_one_bad_request_does_not_fail_the_ones_submitted_with_it(
    client: InferenceClient, settings: Settings, redis: Redis
) -> None:
    """Submits of one event-loop turn share one admission call: a lone surrogate is refused alone."""
    prompts = [f"good {i}" for i in range(9)] + ["bad \ud800"]
    outcomes = await asyncio.gather(
        *(client.submit(prompt=p, model=MODEL, max_tokens=2) for p in prompts), return_exceptions=True
    )
    assert [type(o).__name__ for o in outcomes] == ["RequestHandle"] * 9 + ["InvalidRequest"]
    assert await redis.xlen(Keys(settings.key_prefix).queue(MODEL)) == 9


async def test_the_cli_refuses_an_empty_prompt(settings: Settings) -> None:
    out = await inferq(settings, "submit", "-m", MODEL, "--prompt", "")
    assert out.returncode == 2 and "empty" in out.stderr and "Traceback" not in out.stderr


async def test_the_worker_checks_again_and_writes_nothing_to_a_foreign_key(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    """Entries added straight to the stream, past the producer's checks: each is refused into the DLQ with
    the reason, its result ends `failed`, and nothing is written to a key that is not inferq's own."""
    keys = Keys(settings.key_prefix)
    stream = keys.queue(MODEL)
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    own_job = keys.done("job-a")
    foreign = {
        "to-foreign-stream": {"reply_stream": "otherapp:events"},
        "to-other-job": {"reply_stream": keys.done("job-b")},
        "to-foreign-channel": {"reply_channel": "otherapp:chan", "stream": True},
        "too-big": {"prompt": "x" * 4096},
        "too-many-tokens": {"max_tokens": 10**6},
    }
    subscriber = redis.pubsub()
    await subscriber.subscribe("otherapp:chan")
    for request_id, extra in foreign.items():
        entry = {"v": 1, "id": request_id, "model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": False, **extra}
        await redis.xadd(stream, {"m": pack(entry)})
    fine = {"v": 1, "id": bulk_request_id("job-a", 0, "fine"), "model": MODEL, "prompt": "hi", "max_tokens": 2,
            "stream": False, "reply_stream": own_job}  # fmt: skip
    await redis.xadd(stream, {"m": pack(fine)})
    # Poison that names no reply stream: its id is job-a's, so job-a still gets the line's `failed` record.
    poison = {"v": 1, "id": bulk_request_id("job-a", 0, "poison"), "model": MODEL, "prompt": "", "max_tokens": 2}
    await redis.xadd(stream, {"m": pack(poison)})
    start_worker("--engine", "standin", "--model", MODEL, env={"INFERQ_MAX_REQUEST_BYTES": "2048"})

    async def all_ended() -> bool:  # entries added by hand have no client waiting: ask Redis
        return await drained(redis, settings, MODEL) == (0, 0)

    await wait_until(all_ended, 30, "every entry to end")
    assert (await client.get(str(fine["id"]))).status == "done"
    assert await redis.xlen(keys.dlq(MODEL)) == len(foreign) + 1  # and the poison
    for request_id in foreign:
        result = await client.get(request_id)
        assert result.status == "failed" and (result.error or "").startswith("refused: "), result
    assert "reply_stream" in (await client.get("to-foreign-stream")).error  # type: ignore[operator]
    assert "INFERQ_MAX_REQUEST_BYTES" in (await client.get("too-big")).error  # type: ignore[operator]
    assert "INFERQ_MAX_TOKENS_LIMIT" in (await client.get("too-many-tokens")).error  # type: ignore[operator]
    assert not await redis.exists("otherapp:events", keys.done("job-b"))
    records = {r["id"]: r["status"] for r in (unpack(f[b"m"]) for _, f in await redis.xrange(own_job))}
    assert records == {fine["id"]: "done", poison["id"]: "failed"}  # job-a's two lines, and nothing else
    assert await subscriber.get_message(ignore_subscribe_messages=True, timeout=0) is None
    await subscriber.aclose()


async def test_redis_unreachable_is_one_line_with_its_own_exit_code(settings: Settings) -> None:
    """No traceback, no password, exit 5; the same for a URL of the wrong scheme (exit 2)."""
    url = f"redis://user:s3cret-pw@127.0.0.1:{free_port()}/0"
    down = await inferq(settings.merged(redis_url=url), "submit", "-m", MODEL, "-p", "hi", "--timeout", "5")
    assert down.returncode == 5, down.stderr
    assert "cannot reach Redis" in down.stderr and "INFERQ_REDIS_URL" in down.stderr
    assert "Traceback" not in down.stderr and "s3cret-pw" not in down.stderr + down.stdout
    wrong = await inferq(settings, "status", INFERQ_REDIS_URL="http://user:s3cret-pw@127.0.0.1:1/0")
    assert wrong.returncode == 2 and "INFERQ_REDIS_URL" in wrong.stderr
    assert "s3cret-pw" not in wrong.stderr + wrong.stdout and len(wrong.stderr.splitlines()) == 1


async def test_a_worker_that_starts_before_redis_waits_for_it(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    cfg = settings.merged(redis_url=f"redis://127.0.0.1:{port}/0")
    worker = WorkerProcess(cfg, "--engine", "standin", "--model", MODEL, name="early", log_path=tmp_path / "w.log")
    server = EmbeddedServer(tmp_path / "late-redis", port)

    async def waiting() -> bool:  # only its log says so: there is no Redis yet to ask
        return "waiting for Redis" in worker.log()

    try:
        await wait_until(waiting, 60, "the worker to say it waits for Redis")
        assert worker.proc.poll() is None  # still there, waiting
        server.start()
        await asyncio.to_thread(worker.wait_ready)
        async with InferenceClient(cfg) as late_client:
            result = await (await late_client.submit(prompt="hi", model=MODEL, max_tokens=2)).result(timeout=30)
        assert result.status == "done"
        assert worker.log().count("waiting for Redis") == 1  # said once, not once per retry
    finally:
        assert worker.stop() == 0, worker.log()[-2000:]
        server.stop()


async def test_the_dlq_is_bounded_counts_what_it_dropped_and_keeps_every_reason(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    keys = Keys(settings.key_prefix)
    start_worker(
        "--engine", "standin", "--model", MODEL, env={"INFERQ_DLQ_MAX_LEN": "3", "INFERQ_DLQ_MAX_PAYLOAD_BYTES": "100"}
    )  # fmt: skip
    refused = [await client.submit(prompt="fail", model=MODEL, max_tokens=2) for _ in range(5)]
    for handle in refused:  # the stand-in engine refuses the prompt "fail": each is dead-lettered
        assert (await handle.result(timeout=30)).status == "failed"
    blob = b"\xc1" + b"x" * 500  # undecodable, and over the payload bound
    await redis.xadd(keys.queue(MODEL), {"m": blob})

    async def all_ended() -> bool:
        return await drained(redis, settings, MODEL) == (0, 0)

    await wait_until(all_ended, 30, "the undecodable entry to be dead-lettered")
    letters = await client.dead_letters(MODEL).list()
    assert len(letters) == 3 and await redis.get(keys.dlq_dropped(MODEL)) == b"3"  # the oldest three went
    assert [bool(letter.error) for letter in letters] == [True, True, True]
    newest = letters[-1]
    assert "undecodable" in newest.error and (newest.payload, newest.payload_bytes) == (b"", len(blob))
    with pytest.raises(InvalidRequest, match="INFERQ_DLQ_MAX_PAYLOAD_BYTES"):
        await client.dead_letters(MODEL).retry(newest.id)
    shown = await inferq(settings, "status")
    assert "3 dead letters (3 older ones dropped)" in shown.stdout

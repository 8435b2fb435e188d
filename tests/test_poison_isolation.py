"""A request that kills the engine takes only itself down: its batchmates finish (stand-in engine: the
prompt "die" fails the whole engine, as a crashed vLLM engine core would)."""

from __future__ import annotations

from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings
from tests.conftest import drained, wait_until

MODEL = "fake"
FAST_CLAIMS = {"INFERQ_CLAIM_IDLE_MS": "1000", "INFERQ_HEARTBEAT_S": "0.2"}


async def test_an_engine_killing_request_ends_alone_in_the_dlq(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    good = [await client.submit(prompt=f"good {i}", model=MODEL, max_tokens=50, stream=False) for i in range(10)]
    pill = await client.submit(prompt="die", model=MODEL, max_tokens=50, stream=False)
    good += [await client.submit(prompt=f"good {i}", model=MODEL, max_tokens=50, stream=False) for i in range(10, 20)]
    ids = [h.id for h in [*good, pill]]

    async def all_ended() -> bool:
        return all([(await client.get(i)).final for i in ids])

    # Workers come and go as a supervisor would restart them: each one the pill kills exits 1.
    crashes = 0
    for n in range(8):
        worker = start_worker("--engine", "standin", "--model", MODEL, name=f"w{n}", env=FAST_CLAIMS, wait=False)

        async def settled(worker=worker) -> bool:  # type: ignore[no-untyped-def]
            return worker.proc.poll() is not None or await all_ended()

        await wait_until(settled, 60, "the worker to die or every request to end")
        if worker.proc.poll() is not None:
            assert worker.proc.returncode == 1, worker.log()[-2000:]
            crashes += 1
        if await all_ended():
            break
    results = [await client.get(h.id) for h in good]
    assert [r.status for r in results] == ["done"] * 20
    assert all(r.text == "".join(f"t{i} " for i in range(50)) for r in results)
    died = await client.get(pill.id)
    assert died.status == "failed" and "delivered 4 times" in (died.error or "")
    letters = await client.dead_letters(MODEL).list()
    assert [letter.request.id for letter in letters if letter.request] == [pill.id]
    assert crashes == 3  # together, then together again, then alone: then it is known for what it is
    assert await drained(redis, settings, MODEL) == (0, 0)
    assert await redis.xlen(Keys(settings.key_prefix).dlq(MODEL)) == 1

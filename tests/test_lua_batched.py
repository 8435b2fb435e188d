"""Calls of a batched script (the worker's start and finish, once per request) merged into one EVALSHA per hash
slot answer exactly as the same calls sent one by one: each its own reply, an error only its own."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ResponseError

from inferq.shared.keys import Keys
from inferq.shared.lua import Merged
from inferq.shared.settings import Settings
from inferq.worker import scripts


def _start(result_key: str, entry: str) -> tuple[list[str], list[object]]:
    """start.lua's KEYS and ARGV for a request admitted with `entry`."""
    return [result_key], ["w0", "100.0", 60, "tiny", "99.0", entry]


async def test_merged_calls_answer_one_by_one_and_an_error_stays_its_own(redis: Redis, settings: Settings) -> None:
    keys = Keys.of(settings)
    results = [keys.result(f"req-{i}") for i in range(4)]
    for i, key in enumerate(results):
        await redis.hset(key, mapping={"status": "queued", "entry": f"{i}-0 lane"})
    await redis.hset(results[2], "status", "cancelled")  # ended while queued: start.lua only reports it
    await redis.delete(results[3])
    await redis.set(results[3], "not a hash")  # start.lua's HMGET on it fails: that call's error alone
    calls = [_start(key, f"{i}-0 lane") for i, key in enumerate(results)]
    calls.append(_start(results[0], "9-9 forged"))  # another entry naming req-0 (run after req-0's own start)
    commands = [scripts.START.command(k, a) for k, a in calls]
    merged = Merged([commands[0], ("PING",), *commands[1:]])
    assert [c[0] for c in merged.commands] == ["EVALSHA", "PING"]  # all five calls in one, where the first stood
    sent = merged.commands[0]
    assert sent[2] == len(calls) and sent[3 + len(calls)] == len(calls)  # a key per call, then how many calls

    replies = await scripts.START.run_all(redis, calls)
    assert replies[:3] == [[b"running", 1], [b"running", 1], b"cancelled"]  # running: with the attempts so far
    assert isinstance(replies[3], ResponseError) and "WRONGTYPE" in str(replies[3])
    assert replies[4] == b"foreign"
    for key in results[:2]:  # the calls after the failed one ran too
        assert await redis.hmget(key, "status", "attempts", "worker") == [b"running", b"1", b"w0"]
    assert await redis.hget(results[2], "status") == b"cancelled"
    assert await redis.ttl(results[0]) > 0


async def test_calls_of_different_slots_go_in_different_calls(redis: Redis, settings: Settings) -> None:
    """A cluster runs a script on the node of its keys' slot: calls are merged only within one slot."""
    keys = Keys.of(settings.model_copy(update={"shards": 3}))
    ids = [f"req-{i}" for i in range(12)]
    shards = {keys.shard_of(i) for i in ids}
    assert len(shards) == 3
    commands = [scripts.START.command(*_start(keys.result(i), "1-0 lane")) for i in ids]
    merged = Merged(commands)
    slots = [key_slot(c[3].encode()) for c in merged.commands]
    assert len(merged.commands) == 3 and len(set(slots)) == 3
    assert len(Merged(commands, by_slot=False).commands) == 1  # one server runs any keys in one call
    replies = await scripts.START.run_all(redis, [_start(keys.result(i), "1-0 lane") for i in ids])
    assert replies == [[b"running", 1]] * len(ids)  # no result hash yet (not admitted): started all the same


async def test_a_server_that_lost_its_scripts_runs_every_merged_call_once(redis: Redis, settings: Settings) -> None:
    keys = Keys.of(settings)
    await redis.script_flush()
    calls = [_start(keys.result(f"req-{i}"), "1-0 lane") for i in range(300)]  # more than one EVALSHA holds
    assert len(Merged([scripts.START.command(k, a) for k, a in calls]).commands) == 2
    assert await scripts.START.run_all(redis, calls) == [[b"running", 1]] * 300
    assert {await redis.hget(keys.result(f"req-{i}"), "attempts") for i in range(300)} == {b"1"}

"""The contracts in shared/: schemas refuse bad input with a clear reason, the codec never unpickles,
key names follow docs/CONTRACTS.md, Lua scripts take their constants and keys from one place."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from redis.crc import key_slot

from inferq.shared.codec import pack, unpack
from inferq.shared.errors import BadPayload, ConfigError, InferqError, QueueFull
from inferq.shared.keys import Keys, bulk_request_id
from inferq.shared.schemas import FINAL_STATES, GenerationRequest, Result
from inferq.shared.settings import load_settings
from tests.conftest import ROOT


def test_keys_follow_the_contract() -> None:
    k = Keys("inferq")
    assert k.queues("tiny") == ["inferq:q:tiny:high:{0}", "inferq:q:tiny:normal:{0}", "inferq:q:tiny:low:{0}"]
    assert k.result("abc") == "inferq:r:abc:{0}"
    assert k.tokens("c1") == "inferq:t:c1"
    assert k.dlq("tiny") == "inferq:dlq:tiny:{0}"
    assert k.worker("w") == "inferq:w:w"
    assert k.cancel() == "inferq:cancel"
    assert k.done("job") == "inferq:done:job:{0}"
    assert k.shard_of_key("inferq:q:tiny:low:{0}") == 0
    assert k.shard_of_key("inferq:q:tiny:low") is None  # untagged: not one of ours
    with pytest.raises(ValueError, match="unknown lane"):
        k.queue("tiny", "urgent")


def test_shards_spread_over_the_slots_and_each_script_touches_one_slot() -> None:
    k = Keys("inferq", shards=3)
    # Shard i's tag hashes into the i-th third of the 16384 slots: an evenly split 3-master cluster holds one each.
    assert [key_slot(k.queue("tiny", "high", shard).encode()) * 3 // 16384 for shard in range(3)] == [0, 1, 2]
    ids = [f"req-{i}" for i in range(3000)]
    per_shard = Counter(k.shard_of(i) for i in ids)
    assert sorted(per_shard) == [0, 1, 2] and min(per_shard.values()) > 850
    for request_id in ids[:50]:  # admit.lua, start.lua, finish.lua: lane stream, result, counters, DLQ
        shard = k.shard_of(request_id)
        keys = [k.result(request_id), *k.queues("tiny", shard), k.tenants("tiny", shard), k.refusals("tiny", shard)]
        keys += [k.dlq("tiny", shard), k.dlq_dropped("tiny", shard)]
        assert len({key_slot(key.encode()) for key in keys}) == 1, keys
    # A bulk job's requests live in its shard, with its record and reply stream (job.lua, finish.lua).
    job = "bj-1"
    line = bulk_request_id(job, 2, "ab12")
    same = [k.result(line), k.done(job), k.bulk(job), k.bulk_ids(job), k.bulk_input(job), k.bulk_lease(job)]
    assert len({key_slot(key.encode()) for key in same}) == 1
    assert k.is_reply_stream_of(k.done(job), line)
    assert not k.is_reply_stream_of(k.done(job), bulk_request_id("bj-2", 2, "ab12"))
    assert not k.is_reply_stream_of(k.done(job), f"bulk-{job}-free-form")  # not a line id: another shard maybe
    assert k.shard_of_key(k.queue("tiny", "low", 2)) == 2
    assert Keys("inferq", shards=2).shard_of_key(k.queue("tiny", "low", 2)) is None  # another shard count's tag


def test_request_roundtrip_through_msgpack() -> None:
    req = GenerationRequest(id="r1", model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    back = GenerationRequest.from_payload(unpack(pack(req.payload())))
    assert back == req
    assert back.messages is not None and back.messages[0].content == "hi"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"v": 2, "id": "a", "model": "m", "prompt": "x"}, "unsupported schema version 2"),
        ({"v": 1, "model": "m", "prompt": "x"}, "id: Field required"),
        ({"v": 1, "id": "a", "model": "m"}, "exactly one of prompt or messages"),
        (
            {"v": 1, "id": "a", "model": "m", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
            "exactly one",
        ),
        ({"v": 1, "id": "a", "model": "m", "prompt": "   "}, "prompt is empty"),
        ({"v": 1, "id": "a", "model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"v": 1, "id": "a", "model": "m", "prompt": "x", "colour": "red"}, "colour: Extra inputs"),
        ([1, 2, 3], "expected a map"),
    ],
)
def test_bad_payloads_say_why(payload: object, reason: str) -> None:
    with pytest.raises(BadPayload, match=reason):
        GenerationRequest.from_payload(payload)


def test_codec_rejects_garbage_and_pickle() -> None:
    pickled = b"\x80\x04\x95\x0a\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01v\x94K\x01s."  # a pickle of {"v": 1}
    with pytest.raises(BadPayload, match="undecodable"):
        unpack(b"\xc1\xff\x00garbage")
    # A pickle is just bytes to msgpack: it never turns back into Python objects.
    with pytest.raises(BadPayload):
        GenerationRequest.from_payload(unpack(pickled))


def test_result_from_hash() -> None:
    raw = {
        b"status": b"done",
        b"text": b"Paris",
        b"prompt_tokens": b"7",
        b"completion_tokens": b"2",
        b"queued_at": b"1.5",
    }
    r = Result.from_hash("x", raw)
    assert (r.status, r.text, r.usage.total_tokens, r.timings.queued_at, r.final) == ("done", "Paris", 9, 1.5, True)


def test_settings_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_MAX_INFLIGHT", "7")
    monkeypatch.setenv("INFERQ_MODEL", "tiny")
    s = load_settings(model="smollm2")  # a flag beats the environment
    assert (s.max_inflight, s.model, s.redis_url) == (7, "smollm2", None)
    with pytest.raises(ConfigError, match="redis://"):
        load_settings(redis_url="http://localhost")
    monkeypatch.setenv("INFERQ_MAX_INFLIGHT", "0")
    with pytest.raises(ConfigError, match="INFERQ_"):
        load_settings()


def test_errors_share_one_root() -> None:
    err = QueueFull("tiny", 10, 3, 1.5)
    assert isinstance(err, InferqError)
    assert "retry in ~1.5s" in str(err)


LUA_SCRIPTS = sorted((ROOT / "producer").rglob("*.lua")) + sorted((ROOT / "worker").rglob("*.lua"))


@pytest.mark.parametrize("path", LUA_SCRIPTS, ids=lambda p: p.name)
def test_lua_scripts_neither_spell_out_the_final_states_nor_build_key_names(path: Path) -> None:
    """The final states are defined once (schemas.FINAL_STATES; scripts get them as FINAL from shared.lua),
    and every key a script touches comes in as KEYS, formatted by keys.py."""
    source = re.sub(r"--.*", "", path.read_text())  # the code, without its comments
    spelled = {state for state in FINAL_STATES if f"'{state}'" in source or f'"{state}"' in source}
    assert len(spelled) <= 1, f"{path.name} spells out final states {sorted(spelled)}: use FINAL[status]"
    assert not re.search(r"redis\.call\([^)]*\.\.", source), f"{path.name} builds a key name"
    assert "cmsgpack.pack" not in source, f"{path.name} builds a record: the caller builds every record"


async def test_every_script_loads_and_runs_by_sha(redis_server) -> None:  # type: ignore[no-untyped-def]
    """A server that knows no script (a fresh or restarted one): the first call loads it, by its sha."""
    from redis.asyncio import Redis

    from inferq.producer.client import CANCEL

    async with Redis.from_url(redis_server.url) as r:
        await r.script_flush()
        assert await CANCEL(r, ["t-lua:r:none"], ["none", "0", "t-lua:cancel"]) == b""
        assert (await r.script_exists(CANCEL.sha)) == [True]

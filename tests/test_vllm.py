"""The engine-facing path on real vLLM (CPU build) with the tiny model, through a real worker process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
import pytest
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.producer.local import inferq_argv, worker_env
from inferq.shared.codec import pack
from inferq.shared.heap import YOUNG_THRESHOLD
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings
from tests.conftest import WorkerProcess, drained, free_port, wait_until
from tests.test_worker_metrics import get, scrape


@pytest.fixture
async def tiny(tiny_worker: WorkerProcess) -> Settings:
    return tiny_worker.settings


def sends_of(sizes: list[int], interval: int, total: int) -> bool:
    """Whether token events of these sizes are vLLM's sends: the first token at once, then every `interval` tokens,
    then the rest ([1, 5, 5, 5, 5, 3] for 24 at 5). An output the worker had not taken yet when the next came is
    merged with it (vLLM's DELTA collector; with the model in the engine core, steps are quick enough for that
    to happen now and then under load), so an event may carry several sends, never part of one: its running
    totals are among the sends' own."""
    return sum(sizes) == total and set(itertools.accumulate(sizes)) <= {1, *range(1 + interval, total, interval), total}


async def test_streamed_tokens_match_stored_result(tiny: Settings, redis: Redis) -> None:
    async with InferenceClient(tiny) as client:
        handle = await client.submit(prompt="The queue holds requests", max_tokens=24, temperature=0, model="tiny")
        events = [e async for e in handle.tokens(timeout=60)]
        result = await handle.result(timeout=60)
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[-1].finished and not any(e.finished for e in events[:-1])
    # The first token at once, then INFERQ_STREAM_INTERVAL (default 8) tokens per event, the rest with the end.
    assert Settings().stream_interval == 8 and sends_of([len(e.token_ids) for e in events], 8, 24)
    assert result.status == "done" and result.finish_reason == "length"
    assert "".join(e.text for e in events) == result.text != ""
    assert sum(len(e.token_ids) for e in events) == result.usage.completion_tokens == 24
    assert result.usage.prompt_tokens > 0
    assert result.worker == "tiny-0" and result.attempts == 1
    async with Redis.from_url(tiny.redis_url or "") as r:
        assert await drained(r, tiny, "tiny") == (0, 0)


async def test_a_request_chooses_its_tokens_per_event(tiny: Settings) -> None:
    async with InferenceClient(tiny) as client:
        sizes = {}
        for interval in (1, 5):
            handle = await client.submit(
                prompt="The queue holds requests", max_tokens=24, temperature=0, model="tiny", stream_interval=interval
            )
            events = [e async for e in handle.tokens(timeout=60)]
            result = await handle.result(timeout=60)
            assert "".join(e.text for e in events) == result.text and result.usage.completion_tokens == 24
            assert [e.seq for e in events] == list(range(len(events)))
            sizes[interval] = [len(e.token_ids) for e in events]
    assert sends_of(sizes[5], 5, 24) and len(sizes[5]) <= 6 < len(sizes[1]), sizes  # 24 sends at 1


async def test_greedy_is_deterministic_and_batched_requests_all_finish(tiny: Settings) -> None:
    async with InferenceClient(tiny) as client:
        handles = [
            await client.submit(
                prompt=f"Request number {i % 4}", max_tokens=16, temperature=0, model="tiny", stream=i % 2 == 0
            )
            for i in range(32)
        ]
        results = await asyncio.gather(*(h.result(timeout=120) for h in handles))
    assert all(r.status == "done" and r.usage.completion_tokens == 16 for r in results)
    # Same prompt, greedy: same text, whichever batch it ran in.
    for i in range(4):
        assert len({r.text for j, r in enumerate(results) if j % 4 == i}) == 1


async def test_chat_messages_use_the_chat_template(tiny: Settings) -> None:
    async with InferenceClient(tiny) as client:
        chat = await client.generate(
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
            max_tokens=4, temperature=0, model="tiny",
        )  # fmt: skip
        plain = await client.generate(prompt="Hello!", max_tokens=4, temperature=0, model="tiny")
    # The template wraps the two messages in ChatML markers: many more prompt tokens than the bare text.
    assert chat.usage.prompt_tokens > plain.usage.prompt_tokens + 8


async def test_stop_strings_and_seeded_sampling(tiny: Settings) -> None:
    async with InferenceClient(tiny) as client:
        a = await client.generate(prompt="Hello", max_tokens=12, temperature=1.0, seed=7, model="tiny")
        b = await client.generate(prompt="Hello", max_tokens=12, temperature=1.0, seed=7, model="tiny")
        assert a.text == b.text
        cut = a.text[3:6]
        stopped = await client.generate(
            prompt="Hello", max_tokens=12, temperature=1.0, seed=7, stop=[cut], model="tiny"
        )
    assert stopped.finish_reason == "stop" and cut not in stopped.text and a.text.startswith(stopped.text)


async def test_too_long_prompt_fails_with_reason_and_dead_letters(tiny: Settings, redis: Redis) -> None:
    async with InferenceClient(tiny) as client:
        handle = await client.submit(prompt="word " * 3000, max_tokens=8, model="tiny")
        events = [e async for e in handle.tokens(timeout=60)]
        result = await handle.result(timeout=60)
        ok = await client.generate(prompt="still serving", max_tokens=2, model="tiny")
    assert events == []  # the stream ended without tokens; the stored result says why
    assert result.status == "failed" and "exceeds the model's context of 2048 tokens" in (result.error or "")
    assert ok.status == "done"
    async with Redis.from_url(tiny.redis_url or "") as r:
        dlq = await r.xrange(Keys(tiny.key_prefix).dlq("tiny"))
        assert any(b"exceeds the model's context" in fields[b"error"] for _, fields in dlq)
        assert await drained(r, tiny, "tiny") == (0, 0)


async def test_a_long_prompt_is_tokenized_off_the_event_loop(tiny: Settings) -> None:
    """A 1 MB prompt takes the tokenizer about half a second. Tokenized on the worker's event loop, it would
    hold everything else up (claims, streams, reads) and end first; off the loop, a short request sent with it
    runs beside it and ends first."""
    async with InferenceClient(tiny) as client:
        long, short = await asyncio.gather(
            client.submit(prompt="word " * 200_000, max_tokens=2, model="tiny", stream=False),
            client.submit(prompt="The queue", max_tokens=2, model="tiny", stream=False),
        )
        long_result, short_result = await long.result(timeout=60), await short.result(timeout=60)
    assert long_result.status == "failed" and "exceeds the model's context" in (long_result.error or "")
    assert short_result.status == "done"
    assert short_result.timings.finished_at < long_result.timings.finished_at  # type: ignore[operator]


async def test_the_gateway_answers_as_the_queue_does_on_vllm(tiny: Settings, start_gateway) -> None:
    """Completions through the gateway, whole and streamed with the official SDK, greedy: the same text and
    token counts as the same request through the Python client; a request over the context is a 400."""
    gateway = start_gateway(cfg=tiny)
    async with InferenceClient(tiny) as client:
        direct = await client.generate(prompt="The queue holds", max_tokens=12, temperature=0, model="tiny")
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0) as sdk:
        whole = await sdk.completions.create(model="tiny", prompt="The queue holds", max_tokens=12, temperature=0)
        pieces = await sdk.completions.create(
            model="tiny", prompt="The queue holds", max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in pieces]
        with pytest.raises(openai.BadRequestError, match="context") as too_long:
            await sdk.completions.create(model="tiny", prompt="word " * 3000, max_tokens=8)
    assert whole.choices[0].text == direct.text and whole.usage.completion_tokens == 12  # type: ignore[union-attr]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct.text
    assert chunks[-1].usage.prompt_tokens == direct.usage.prompt_tokens  # type: ignore[union-attr]
    assert too_long.value.code == "context_length_exceeded"


async def test_engine_arguments_reach_vllm(settings: Settings, start_worker) -> None:
    """INFERQ_ENGINE_ARGS sets vLLM's own max_num_seqs over the worker's default (its max_inflight): with 2,
    of four requests read at once only two run until one ends."""
    start_worker(
        "--model", "tiny", "--max-inflight", "8", "--no-bulk-jobs", env={"INFERQ_ENGINE_ARGS": '{"max_num_seqs": 2}'}
    )
    async with InferenceClient(settings) as client:
        handles = await asyncio.gather(*(
            client.submit(prompt=f"Request {i}", max_tokens=24, temperature=0, model="tiny", stream=False)
            for i in range(4)
        ))  # fmt: skip
        results = [await h.result(timeout=120) for h in handles]
    assert [r.status for r in results] == ["done"] * 4
    firsts = sorted(r.timings.first_token_at or 0 for r in results)
    ends = sorted(r.timings.finished_at or 0 for r in results)
    assert firsts[2] >= ends[0], (firsts, ends)  # the third began only once a sequence slot was free


def test_an_unknown_engine_argument_is_one_line_before_anything_loads(settings: Settings) -> None:
    argv = inferq_argv("worker", "--model", "tiny", "--engine-arg", "max_num_seqs=4", "--engine-arg", "warp_drive=9")
    done = subprocess.run(argv, env=worker_env(settings), capture_output=True, text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1]  # after what vLLM itself logs as it is imported
    assert done.returncode == 2 and last.startswith("error: unknown vLLM engine argument(s): warp_drive;"), done.stderr
    assert "Traceback" not in done.stderr and "EngineCore" not in done.stderr and "engine_args" in last


def test_a_killed_worker_leaves_no_engine_process(settings: Settings, start_worker) -> None:
    """SIGKILL, the one signal a worker cannot clean up after: its engine core (and any model process) dies
    with it within seconds (worker/vllm_children.py), instead of holding its memory as an orphan."""
    worker = start_worker("--model", "tiny", "--max-inflight", "4", "--no-bulk-jobs")
    engine = psutil.Process(worker.proc.pid).children(recursive=True)
    assert any("EngineCore" in " ".join(p.cmdline()) or "VLLM" in p.name() for p in engine), engine
    os.kill(worker.proc.pid, signal.SIGKILL)  # the worker alone, not its process group
    give_up = time.monotonic() + 20
    while alive := [p for p in engine if _running(p)]:
        assert time.monotonic() < give_up, f"left running after their worker was killed: {alive}"
        time.sleep(0.1)


def test_a_worker_stopped_while_its_engine_loads_leaves_no_engine_process(settings: Settings, start_worker) -> None:
    """SIGTERM while vLLM starts, once its engine core runs (its own SIGTERM handler set, which only notes a stop
    while it loads; our plugin perhaps not yet run in it): the worker stops at once with 143, and the engine
    processes it started go with it. They used to wait minutes for a parent that was gone."""
    worker = start_worker("--model", "tiny", "--max-inflight", "4", "--no-bulk-jobs", wait=False)
    me = psutil.Process(worker.proc.pid)

    def titles() -> list[str]:
        found = []
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # vLLM's short-lived helpers (lscpu) come and go
                found.append(" ".join(child.cmdline()))
        return found

    give_up = time.monotonic() + 120
    while not any(title.startswith("VLLM::EngineCore") for title in titles()):
        assert worker.proc.poll() is None and time.monotonic() < give_up, worker.log()[-2000:]
        time.sleep(0.05)
    started = me.children(recursive=True)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(30) == 128 + signal.SIGTERM, worker.log()[-2000:]
    assert "SIGTERM while the engine loads: stopping now" in worker.log()
    give_up = time.monotonic() + 30
    while alive := [p for p in started if _running(p)]:
        assert time.monotonic() < give_up, f"left running after their worker stopped: {alive}"
        time.sleep(0.1)


async def test_a_stopped_worker_leaves_no_socket_files_behind(settings: Settings, start_worker) -> None:
    """vLLM binds its engine's ZeroMQ sockets to files in the temp dir and leaves them there when it stops: three
    a start. A worker's engine binds them in a directory of its own, which goes when it stops; one a SIGKILLed
    worker left goes when the next engine starts, and one of a process still running stays."""
    tmp = Path(tempfile.mkdtemp(prefix="iq"))  # short: a socket's path has at most 107 bytes
    stale, live = _engine_dir(tmp, _ended_pid()), _engine_dir(tmp, os.getpid())
    try:
        worker = start_worker("--model", "tiny", "--max-inflight", "4", "--no-bulk-jobs", env={"TMPDIR": str(tmp)})
        assert not stale.exists() and live.exists()
        shutil.rmtree(live)

        def sockets() -> list[Path]:
            return [p for p in tmp.rglob("*") if p.is_socket()]

        def engine_dirs() -> list[Path]:
            return list(tmp.glob("inferq-vllm-*"))

        assert sockets() and {p.parent for p in sockets()} == set(engine_dirs())  # one directory, the engine's
        async with InferenceClient(settings) as client:
            handle = await client.submit(prompt="Hello", model="tiny", max_tokens=2, stream=False)
            assert (await handle.result(timeout=120)).status == "done"
        assert worker.stop() == 0, worker.log()[-2000:]
        assert sockets() == [] and engine_dirs() == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ended_pid() -> int:
    """The pid of a process that has ended (and was reaped): no process has it now."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    return ended.pid


def _engine_dir(base: Path, pid: int) -> Path:
    """A socket directory as an engine of process `pid` leaves it (worker/vllm_children.py, own_ipc_dir)."""
    made = base / f"inferq-vllm-{pid}-a1b2c3"
    made.mkdir()
    (made / "0cedb373-f66a-4da0-9f68-99dc303230bd").touch()
    return made


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def test_cancel_aborts_a_running_request_in_the_engine(tiny: Settings, redis: Redis) -> None:
    async with InferenceClient(tiny) as client:
        handle = await client.submit(prompt="Tell a very long story", max_tokens=1500, temperature=0, model="tiny")
        events = handle.tokens(timeout=120)
        seen = [await events.__anext__()]
        assert await handle.cancel() == "running"
        seen += [e async for e in events]
        result = await handle.result(timeout=60)
        after = await client.generate(prompt="the engine still serves", max_tokens=3, model="tiny")
    assert seen[-1].finished and (seen[-1].finish_reason, seen[-1].status) == ("cancelled", "cancelled")
    assert [e.seq for e in seen] == list(range(len(seen)))
    assert (result.status, result.finish_reason) == ("cancelled", "cancelled")
    assert result.text == "".join(e.text for e in seen) and 0 < result.usage.completion_tokens < 1500
    assert after.status == "done"
    async with Redis.from_url(tiny.redis_url or "") as r:
        assert await drained(r, tiny, "tiny") == (0, 0)


async def test_deadline_aborts_a_running_request_in_the_engine(tiny: Settings) -> None:
    async with InferenceClient(tiny) as client:
        result = await client.submit(
            prompt="Another long story", max_tokens=1500, temperature=0, model="tiny", ttl=1.5, stream=False
        )
        expired = await result.result(timeout=60)
    assert (expired.status, expired.finish_reason, expired.attempts) == ("expired", "expired", 1)
    assert 0 < expired.usage.completion_tokens < 1500 and expired.text
    # Not streamed: the engine reported the first token, then 64 at a time, and the partial text is what it reported.
    assert (expired.usage.completion_tokens - 1) % 64 == 0


async def test_poison_entries_around_good_requests_on_vllm(tiny: Settings) -> None:
    keys = Keys(tiny.key_prefix)
    stream = keys.queue("tiny")
    good = {"v": 1, "model": "tiny", "prompt": "ok", "max_tokens": 2}
    async with InferenceClient(tiny) as client, Redis.from_url(tiny.redis_url or "") as r:
        before = await client.submit(prompt="good before", model="tiny", max_tokens=2)
        await r.xadd(stream, {"m": b"\x00\xffgarbage"})
        await r.xadd(stream, {"m": pack({**good, "id": "poison-v2", "v": 2})})
        await r.xadd(stream, {"m": pack({"v": 1, "id": "poison-no-model", "prompt": "x"})})
        await r.xadd(stream, {"m": pack({**good, "id": "poison-too-long", "prompt": "word " * 3000})})
        after = await client.submit(prompt="good after", model="tiny", max_tokens=2)
        assert (await before.result(timeout=60)).status == (await after.result(timeout=60)).status == "done"
        too_long = await client.get("poison-too-long")
        assert too_long.status == "failed" and "exceeds the model's context" in (too_long.error or "")
        reasons = [f[b"error"].decode() for _, f in await r.xrange(keys.dlq("tiny"))]
        assert any("undecodable msgpack" in x for x in reasons)
        assert any("unsupported schema version 2" in x for x in reasons)
        assert any("model: Field required" in x for x in reasons)
        assert any("exceeds the model's context" in x for x in reasons)
        assert await drained(r, tiny, "tiny") == (0, 0)


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="kernel without autogroup scheduling")
async def test_worker_session_yields_cpu_to_redis_and_clients(tiny_worker: WorkerProcess) -> None:
    # The worker leads its own session (conftest starts it so): its group, engine processes included, is at
    # INFERQ_WORKER_NICE, so vLLM's busy polling does not starve Redis and clients (worker/cpu_share.py).
    group = Path(f"/proc/{tiny_worker.proc.pid}/autogroup").read_text()  # noqa: ASYNC240 (procfs: instant)
    assert group.split()[-2:] == ["nice", "5"]


def test_the_model_runs_in_the_engine_core_which_loads_the_spin_plugin(tiny_worker: WorkerProcess) -> None:
    # INFERQ_ENGINE_MODEL_IN_CORE (default on): vLLM's engine core runs the model itself, with the OpenMP threads
    # vLLM would give a model process, and there is no model process (worker/vllm_private.py). INFERQ_ENGINE_SPIN_MS
    # (default 2) still reaches the engine core through our vLLM plugin, which logs it (worker/vllm_spin.py).
    log = tiny_worker.log()
    assert "vLLM runs the model in its engine core process" in log
    assert "OpenMP thread binding info" in log  # vLLM's own OpenMP set-up, made for the engine core
    titles = [" ".join(p.cmdline()) for p in psutil.Process(tiny_worker.proc.pid).children(recursive=True)]
    assert sum(t.startswith("VLLM::EngineCore") for t in titles) == 1, titles
    assert not any(t.startswith("VLLM::Worker") for t in titles), titles
    lines = [line for line in log.splitlines() if "busy-waits 2 ms" in line]
    assert any(line.startswith("(EngineCore pid=") for line in lines), lines


def test_the_worker_keeps_its_startup_heap_out_of_full_collections(tiny_worker: WorkerProcess) -> None:
    # vLLM and torch leave hundreds of thousands of objects behind after the start; frozen, a full collection
    # while serving walks only what serving made, and the young generation is collected less often than
    # Python's default of every 700 allocations (shared/heap.py).
    frozen = re.search(r"startup heap frozen: (\d+) objects.* collected every (\d+) allocations", tiny_worker.log())
    assert frozen is not None and int(frozen.group(1)) > 100_000
    assert int(frozen.group(2)) == YOUNG_THRESHOLD > 700


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of a series' samples over the labels not given."""
    return sum(v for (n, have), v in samples.items() if n == name and set(labels.items()) <= set(have))


async def test_profile_vllm_runs_vllm_as_it_ships_with_its_metrics_and_readiness(
    settings: Settings, start_worker
) -> None:
    """INFERQ_ENGINE_PROFILE=vllm on this CPU: vLLM's own model process and compile, its `vllm:*` series on the
    worker's /metrics beside inferq's, /ready saying 503 until the engine has loaded and 200 after, answered
    promptly all along (vLLM builds its engine off the worker's event loop), and vLLM's own log lines (engine
    core included) as JSON objects."""
    port = free_port()
    worker = start_worker(
        "--model", "tiny", "--max-inflight", "8", "--no-bulk-jobs", "--engine-profile", "vllm",
        "--metrics-port", str(port), "--log-format", "json", wait=False,
    )  # fmt: skip

    answers: list[tuple[float, tuple[int, str]]] = []  # (when, answer)
    unanswered: list[float] = []

    async def ready() -> bool:
        asked = time.monotonic()
        try:
            answers.append((time.monotonic(), await asyncio.wait_for(get(port, "/ready"), 5)))
        except aiohttp.ClientConnectionError:
            return False  # not listening yet
        except TimeoutError:
            unanswered.append(asked)
            return False
        return answers[-1][1][0] == 200

    await wait_until(ready, 180, "the worker's /ready")
    # Never ready before the engine is: every answer before said it was loading.
    replies = [reply for _, reply in answers]
    assert set(replies[:-1]) <= {(503, "not ready: loading the engine\n")} and replies[-1] == (200, "ready\n")
    # The probe answered all through the load (tens of seconds here): no question left unanswered, no long gap.
    gap = max((later - earlier for (earlier, _), (later, _) in itertools.pairwise(answers)), default=0.0)
    assert not unanswered and gap < 5, f"{len(unanswered)} unanswered, longest gap {gap:.1f} s"
    await asyncio.to_thread(worker.wait_ready)
    before = await scrape(port)
    async with InferenceClient(settings) as client:
        handles = [
            await client.submit(prompt=f"Metered {i}", max_tokens=8, ignore_eos=True, model="tiny", stream=False)
            for i in range(3)
        ]
        results = [await h.result(timeout=120) for h in handles]
    assert [r.usage.completion_tokens for r in results] == [8, 8, 8]
    after = await scrape(port)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("vllm:generation_tokens_total", model_name="tiny") == 24  # vLLM's names and labels, as it serves
    assert moved("vllm:request_success_total", model_name="tiny", finished_reason="length") == 3
    assert moved("inferq_requests_ended_total", model="tiny", status="done") == 3
    assert moved("inferq_generation_tokens_total", model="tiny") == 24
    assert total(after, "vllm:num_requests_running", model_name="tiny") == 0
    # vLLM as it ships on CPU: its model in a process of its own, and no busy-wait window of ours.
    titles = [" ".join(p.cmdline()) for p in psutil.Process(worker.proc.pid).children(recursive=True)]
    assert any(t.startswith("VLLM::Worker") for t in titles), titles
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert any(line["message"] == "engine profile vllm (INFERQ_ENGINE_PROFILE=vllm)" for line in lines)
    assert any(line.get("process") == "EngineCore" and line["logger"].startswith("vllm") for line in lines)
    assert not any("busy-waits" in line["message"] for line in lines)


async def test_a_cpu_shared_worker_serves_vllms_metrics_beside_its_own(
    tiny: Settings, tiny_worker: WorkerProcess
) -> None:
    port = tiny_worker.metrics_port  # type: ignore[attr-defined]
    before = await scrape(port)
    async with InferenceClient(tiny) as client:
        handles = [
            await client.submit(prompt=f"Counted {i}", max_tokens=5, ignore_eos=True, model="tiny") for i in range(2)
        ]
        results = [await h.result(timeout=60) for h in handles]
    assert [r.status for r in results] == ["done", "done"]
    after = await scrape(port)
    for name, labels in (
        ("vllm:generation_tokens_total", {"model_name": "tiny"}),
        ("inferq_generation_tokens_total", {"model": "tiny"}),
    ):
        assert total(after, name, **labels) - total(before, name, **labels) == 10, name
    assert await get(port, "/ready") == (200, "ready\n")

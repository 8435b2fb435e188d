"""`inferq bench online`, modelled on `vllm bench serve`: one workload, sent at a fixed concurrency
or at a Poisson request rate, to a target; every request timed alike (bench.stats).

Targets here are the ones a client reaches over the network: inferq through Redis, and vLLM's OpenAI server
(streaming completions). The direct AsyncLLM ceiling is in bench.direct (it loads an engine, which
the producer never does); bench.cli hands whichever target was asked for to `run_load`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from inferq.bench.idle import IdleFreezer
from inferq.bench.stats import Prompt, Timing, environment, summarize
from inferq.producer.client import InferenceClient
from inferq.producer.local import in_own_group, local_worker, stop_group
from inferq.shared.errors import InferqError
from inferq.shared.settings import Settings

Send = Callable[[Prompt, Timing], Awaitable[None]]
Target = Callable[[], AbstractAsyncContextManager[Send]]  # sets a target up (and down) around its runs
# vLLM's model process busy-waits for up to 1 s after its last step, as it ships (direct, openai): the next
# target's run waits that out, or it would share the CPU with the one before it.
SETTLE_S = 1.5
WORDS = "the queue holds requests until a worker is free and then runs them through the model".split()


def fixed_prompts(n: int, prompt_len: int, output_len: int, offset: int = 0) -> list[Prompt]:
    """`n` distinct prompts of `prompt_len` words asking for `output_len` tokens (greedy: the same tokens on
    every target, so output lengths match)."""
    return [
        Prompt(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(prompt_len)) + f" {i}", output_len, prompt_len + 1)
        for i in range(offset, offset + n)
    ]


def dataset_prompts(path: Path, n: int, output_len: int) -> list[Prompt]:
    """Prompts from a JSONL file of {"prompt": ..., "max_tokens"?: ...} lines, cycled to `n`."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                rows.append(
                    Prompt(str(data["prompt"]), int(data.get("max_tokens", output_len)), len(data["prompt"].split()))
                )
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise InferqError(
                    f'{path} line {number}: expected {{"prompt": ..., "max_tokens"?: N}} ({exc})'
                ) from None
    if not rows:
        raise InferqError(f"{path} has no prompts")
    return [rows[i % len(rows)] for i in range(n)]


def run_size(num_requests: int, waves: int, concurrency: int | None) -> int:
    """Measured requests in one run: `num_requests`, or `waves` times the concurrency if that is more (a
    short run at high concurrency is mostly ramp-up and tail)."""
    return max(num_requests, waves * (concurrency or 1))


async def run_load(
    prompts: list[Prompt], send: Send, *, concurrency: int | None = None, rate: float | None = None, seed: int = 0
) -> tuple[list[Timing], float]:
    """Send every prompt: at most `concurrency` at once, and/or started at Poisson times at `rate` per
    second. Returns each request's timing and the wall time. A request that raises is an error, not a stop."""
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    timings: list[Timing] = []

    async def one(prompt: Prompt) -> None:
        async with gate if gate else contextlib.nullcontext():
            timing = Timing(sent=time.perf_counter(), prompt_tokens=prompt.prompt_tokens)
            timings.append(timing)
            try:
                await send(prompt, timing)
            except Exception as exc:  # counted and reported, like vllm bench serve
                timing.error = f"{type(exc).__name__}: {exc}"
            if timing.done is None:
                timing.done = time.perf_counter()

    arrivals = random.Random(seed)
    t0 = time.perf_counter()
    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(one(prompt)))
        if rate:
            await asyncio.sleep(arrivals.expovariate(rate))
    await asyncio.gather(*tasks)
    return timings, time.perf_counter() - t0


def inferq_sender(client: InferenceClient, model: str) -> Send:
    """Submit through Redis and stream the tokens back over pub/sub, as an online caller does."""

    async def send(prompt: Prompt, timing: Timing) -> None:
        handle = await client.submit(
            prompt=prompt.text, model=model, max_tokens=prompt.max_tokens, temperature=0, wait=True
        )
        status = None
        async for event in handle.tokens():
            timing.token(time.perf_counter(), len(event.token_ids))
            status = event.status
        timing.done = time.perf_counter()
        if handle.gap or status is None:  # events were missed: the stored result has the truth
            result = await handle.result()
            timing.output_tokens, status = result.usage.completion_tokens, result.status
        if status != "done":
            timing.error = f"request ended {status}"

    return send


def openai_sender(session: Any, url: str, model: str) -> Send:
    """Streaming /v1/completions on vLLM's OpenAI server: each chunk with text is one step's output (as
    vllm bench serve counts it); the token count comes from the final usage chunk."""

    async def send(prompt: Prompt, timing: Timing) -> None:
        body = {
            "model": model, "prompt": prompt.text, "max_tokens": prompt.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
        }  # fmt: skip
        total = None
        async with await _post(session, f"{url}/v1/completions", body) as response:
            if response.status != 200:
                raise InferqError(f"HTTP {response.status}: {(await response.text())[:200]}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    timing.token(time.perf_counter(), 1)
                if chunk.get("usage") and not choices:
                    total = int(chunk["usage"]["completion_tokens"])
        timing.done = time.perf_counter()
        if total is not None:
            timing.output_tokens = total

    return send


async def _post(session: Any, url: str, body: dict[str, Any]) -> Any:
    """POST once more if the server closed the connection before answering: a pooled keep-alive connection
    that vLLM's server (uvicorn, 5 s idle timeout) closed just as it was reused. Nothing was answered, so
    nothing was counted; the request's clock keeps running from its first try."""
    import aiohttp

    try:
        return await session.post(url, json=body)
    except aiohttp.ServerDisconnectedError:
        return await session.post(url, json=body)


@contextlib.asynccontextmanager
async def openai_session() -> AsyncIterator[Any]:
    import aiohttp  # installed with vLLM; only this target needs it

    # Idle connections are dropped after 2 s, before vLLM's server drops them (5 s) under a new request.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as session:
        yield session


@contextlib.asynccontextmanager
async def openai_server(
    model_path: str,
    model: str,
    *,
    max_num_seqs: int,
    max_model_len: int,
    kv_gib: int,
    stream_interval: int,
    engine_flags: list[str],
) -> AsyncIterator[str]:
    """vLLM's OpenAI server on a free port with inferq's engine settings (`engine_flags`: bench.direct.server_flags);
    yields its URL once /health answers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkstemp(prefix="inferq-bench-openai-", suffix=".log")[1])
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--served-model-name", model,
        *engine_flags, "--max-model-len", str(max_model_len), "--max-num-seqs",
        str(max_num_seqs), "--port", str(port), "--host", "127.0.0.1", "--disable-log-stats",
        "--disable-uvicorn-access-log", "--stream-interval", str(stream_interval),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}  # vLLM as it ships: our plugin acts only in ours
    with open(log, "wb") as out:  # noqa: ASYNC230 - the child's log
        # Its own process group (to stop it whole) but this session: the kernel schedules a session as one
        # group, and vLLM's engine core busy-waits with sched_yield, which yields only within its group. In a
        # session of its own the server kept this client, its only client, off the CPU (1% of a core at
        # concurrency 16, and 667 tok/s against direct's 2,448). Direct's client shares its engine's group.
        proc = await asyncio.create_subprocess_exec(
            *in_own_group(cmd), env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with openai_session() as session:
            while True:  # no event tells when uvicorn listens: ask, as vllm bench serve does
                if proc.returncode is not None:
                    raise InferqError(f"the OpenAI server exited with {proc.returncode}; its log: {log}")
                with contextlib.suppress(Exception):
                    async with session.get(f"{url}/health") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.5)
        yield url
    finally:
        await stop_group(proc, grace_s=60, whole_group=True)


async def measure(
    target: str, send: Send, prompts: list[Prompt], warmup: list[Prompt], *, concurrency: int | None, rate: float | None
) -> dict[str, Any]:
    """Warm up, then run the workload; the summary, labelled with the target and the load."""
    if warmup:
        await run_load(warmup, send, concurrency=concurrency)
    timings, wall = await run_load(prompts, send, concurrency=concurrency, rate=rate)
    load = f"rate {rate}/s" + (f", max {concurrency}" if concurrency else "") if rate else f"concurrency {concurrency}"
    return {"target": target, "load": load, "concurrency": concurrency, "rate": rate, **summarize(timings, wall)}


@contextlib.asynccontextmanager
async def inferq_target(
    settings: Settings, model: str, *, local_engine: str | None = None, max_inflight: int = 256
) -> AsyncIterator[Send]:
    """inferq through Redis; with `local_engine`, a worker started for the bench (else workers must run)."""
    async with contextlib.AsyncExitStack() as stack:
        local = None
        if local_engine:
            args = ("--max-inflight", str(max_inflight), "--stream-interval", str(settings.stream_interval))
            local = await stack.enter_async_context(local_worker(settings, model=model, engine=local_engine, args=args))
        client = await stack.enter_async_context(InferenceClient(settings))
        send = inferq_sender(client, model)
        if local is None:
            yield send
            return
        guard = local.guard

        async def guarded(prompt: Prompt, timing: Timing) -> None:
            await guard(send(prompt, timing))  # a dead local worker fails the run at once, with its log

        yield guarded


@contextlib.asynccontextmanager
async def openai_target(
    url: str | None,
    model: str,
    model_path: str,
    *,
    max_num_seqs: int,
    max_model_len: int,
    kv_gib: int,
    stream_interval: int,
    engine_flags: list[str],
) -> AsyncIterator[Send]:
    """vLLM's OpenAI server at `url`, or (None) one started for the bench with inferq's engine settings."""
    async with contextlib.AsyncExitStack() as stack:
        if url is None:
            url = await stack.enter_async_context(
                openai_server(
                    model_path, model, max_num_seqs=max_num_seqs, max_model_len=max_model_len, kv_gib=kv_gib,
                    stream_interval=stream_interval, engine_flags=engine_flags,
                )
            )  # fmt: skip
        session = await stack.enter_async_context(openai_session())
        yield openai_sender(session, url.rstrip("/"), model)


async def bench_online(
    targets: dict[str, Target],
    prompts: list[Prompt],
    warmup: list[Prompt],
    *,
    model: str,
    concurrencies: list[int | None],
    rate: float | None,
    num_requests: int | None = None,
    waves: int = 0,
    rounds: int = 1,
    freeze_idle: bool = True,
    on_result: Callable[[dict[str, Any]], None] = lambda r: None,
) -> dict[str, Any]:
    """Every target is set up first, warmed up, and stays up. Then, for each round and each load, every target
    in turn warms up and runs the workload (`run_size` of `prompts`); the order rotates by one place from one
    load to the next and, for each load, from round to round, so that no target always runs in the same place
    (a flip would keep the middle one of three in the middle). The targets' runs of one load so lie within a
    minute of each other, and a slow minute of this machine lands on all of them rather than on one: `paired`
    holds, per load, each other target's output throughput over the first target's in each round, and their
    median.

    With `freeze_idle`, the processes of every target but the one whose turn it is are stopped (bench.
    idle): each runs alone on the machine. Without, an idle target is taken to sleep, and `SETTLE_S`
    between runs waits out the busy-wait of vLLM's model process after its last step.
    `results` holds, per target and load, the round with the median output throughput (every round's figure
    in `rounds_output_throughput`); `runs` holds every run."""
    runs: list[dict[str, Any]] = []
    freezer = IdleFreezer()
    async with contextlib.AsyncExitStack() as stack:
        senders = {}
        for name, target in targets.items():
            async with freezer.setting_up(name):
                senders[name] = await stack.enter_async_context(target())
        stack.callback(freezer.thaw_all)  # first on the way out: a stopped target cannot shut down

        async def alone(name: str) -> None:
            if freeze_idle:
                await freezer.alone(name)

        # Once through each before anything is measured: the first run after they all came up was slow
        # (direct 3.1k-3.2k tok/s at 64, against 3.9k-5.6k in later rounds).
        for name, send in senders.items():
            await alone(name)
            await run_load(warmup, send, concurrency=max((c or 1) for c in concurrencies))
        names = list(senders)
        for round_no in range(1, rounds + 1):
            for level, concurrency in enumerate(concurrencies):
                shift = (round_no - 1 + level) % len(names)
                order = names[shift:] + names[:shift]
                for name in order:
                    await alone(name)
                    await asyncio.sleep(SETTLE_S)  # a target ran just before: the warm-up pass, if nothing else
                    count = run_size(num_requests or len(prompts), waves, concurrency)
                    result = await measure(
                        name, senders[name], prompts[:count], warmup, concurrency=concurrency, rate=rate
                    )
                    result["round"] = round_no
                    runs.append(result)
                    on_result(result)
    return {
        "model": model, "environment": environment(), "rounds": rounds, "freeze_idle": freeze_idle,
        "results": medians(runs), "paired": paired(runs, next(iter(targets))), "runs": runs,
    }  # fmt: skip


def paired(runs: list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    """Per load and target other than `base`: its output throughput over `base`'s in each round (the runs of
    one load and round are within a minute of each other), and the median of those ratios (the lower middle
    one for an even count)."""
    rows = []
    others = [t for t in dict.fromkeys(r["target"] for r in runs) if t != base]  # in the order they first ran
    for load in dict.fromkeys(r["load"] for r in runs):
        by_round: dict[int, dict[str, float]] = {}
        for r in runs:
            if r["load"] == load:
                by_round.setdefault(r["round"], {})[r["target"]] = r["output_throughput"]
        for target in others:
            ratios = [t[target] / t[base] for t in by_round.values() if t.get(base) and target in t]
            if ratios:
                median = sorted(ratios)[(len(ratios) - 1) // 2]
                rows.append({"load": load, "target": target, "base": base, "ratios": ratios, "median": median})
    return rows


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target and load (in the order they first ran), the round whose output throughput is the median
    (the lower of the middle two for an even count), with every round's throughput added."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["target"], run["load"]), []).append(run)
    picked = []
    for group in groups.values():
        ordered = sorted(group, key=lambda r: r["output_throughput"])
        median = dict(ordered[(len(ordered) - 1) // 2])
        median["rounds_output_throughput"] = [r["output_throughput"] for r in group]
        picked.append(median)
    return picked

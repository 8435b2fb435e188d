"""Terminal presentation for the CLI: `submit` (text to stdout as it arrives, stats to stderr), `result`,
`cancel`, `status`, `bulk` and the dead-letter commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from inferq.console.status import render_status
from inferq.producer.bulk.attached import BulkJob
from inferq.producer.bulk.detached import BulkJobs
from inferq.producer.bulk.state import JobRecord
from inferq.producer.client import InferenceClient
from inferq.producer.local import local_worker
from inferq.producer.ops.dead_letters import DeadLetters
from inferq.shared.schemas import Result
from inferq.shared.settings import Settings

T = TypeVar("T")


async def submit_and_print(settings: Settings, request: dict[str, Any], *, stream: bool, timeout: float) -> Result:
    """Submit one request; with `stream`, write its text to stdout as it comes. Returns the stored result."""
    async with InferenceClient(settings) as client:
        handle = await client.submit(stream=stream, **request)
        print(f"request {handle.id} queued", file=sys.stderr, flush=True)
        printed = ""
        if stream:
            async for event in handle.tokens(timeout=timeout):
                sys.stdout.write(event.text)
                sys.stdout.flush()
                printed += event.text
        result = await handle.result(timeout=timeout)
    if stream:
        # If events were missed (a reconnect), finish the line from the stored text.
        rest = result.text[len(printed) :] if result.text.startswith(printed) else "\n" + result.text
        sys.stdout.write(rest + "\n")
        sys.stdout.flush()
    print(describe(result), file=sys.stderr, flush=True)
    return result


async def fetch_result(settings: Settings, request_id: str) -> Result:
    async with InferenceClient(settings) as client:
        return await client.get(request_id)


def describe(result: Result) -> str:
    """One line of stats: status, tokens, time to first token, decode speed."""
    t = result.timings
    parts = [f"[{result.status}", f"finish={result.finish_reason}"]
    parts.append(f"tokens in/out {result.usage.prompt_tokens}/{result.usage.completion_tokens}")
    if t.queued_at and t.first_token_at:
        parts.append(f"ttft {1000 * (t.first_token_at - t.queued_at):.0f} ms")
    if t.first_token_at and t.finished_at and result.usage.completion_tokens > 1:
        span = max(t.finished_at - t.first_token_at, 1e-6)
        parts.append(f"{(result.usage.completion_tokens - 1) / span:.1f} tok/s")
    if result.error:
        parts.append(f"error: {result.error}")
    return ", ".join(parts) + "]"


async def cancel_request(settings: Settings, request_id: str) -> str:
    async with InferenceClient(settings) as client:
        return await client.cancel(request_id)


async def with_dead_letters(settings: Settings, model: str | None, action: Callable[[DeadLetters], Awaitable[T]]) -> T:
    """Run one DLQ operation (`inferq dlq ...`) with a client that lives just as long."""
    async with InferenceClient(settings) as client:
        return await action(client.dead_letters(model))


async def show_status(
    settings: Settings, models: list[str] | None, *, watch: bool, interval: float, as_json: bool
) -> None:
    """`inferq status`: print the report once, or again every `interval` seconds until interrupted."""
    async with InferenceClient(settings) as client:
        while True:
            report = await client.stats(models)
            if as_json:
                print(json.dumps(report), flush=True)
            else:
                if watch:
                    print("\x1b[2J\x1b[H", end="")  # clear the screen between refreshes
                print(render_status(report), flush=True)
            if not watch:
                return
            await asyncio.sleep(interval)


async def run_bulk(
    settings: Settings,
    input_path: Path,
    output_path: Path,
    *,
    model: str | None,
    strict: bool,
    local_engine: str | None = None,
) -> tuple[JobRecord, int]:
    """`inferq bulk`: run a JSONL file through the queue with a progress bar on stderr. With `local_engine`,
    a worker with that engine is started for the job and stopped after it. Returns the job and how many
    output lines an earlier run had written."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("bulk", total=None, detail="")
        started = time.monotonic()
        tokens_at_start: int | None = None

        def show(job: JobRecord) -> None:
            nonlocal tokens_at_start
            if tokens_at_start is None:
                tokens_at_start = job.tokens
            rate = (job.tokens - tokens_at_start) / max(time.monotonic() - started, 1e-6)
            detail = f"done {job.done} failed {job.failed} invalid {job.invalid}, {rate:.0f} tok/s"
            bar.update(task, total=job.total or None, completed=job.accounted, detail=detail)

        async with contextlib.AsyncExitStack() as stack:
            local = None
            if local_engine:  # first: vLLM loads while everything else gets ready, and requests queue up
                bar.update(task, description="starting a local worker")
                local = await stack.enter_async_context(
                    local_worker(settings, model=model or settings.model, engine=local_engine)
                )
            client = await stack.enter_async_context(InferenceClient(settings))
            job = BulkJob(client, input_path, output_path, model=model, strict=strict, on_progress=show)
            bar.update(task, description=f"bulk {job.id}")
            ran = await (local.guard(job.run()) if local else job.run())
            return ran, job.resumed


async def with_bulk_jobs(settings: Settings, action: Callable[[BulkJobs], Awaitable[T]]) -> T:
    """Run one detached-job operation (`inferq bulk submit|status|list|cancel|download`)."""
    async with InferenceClient(settings) as client:
        return await action(BulkJobs(client))


def describe_job(job: JobRecord) -> str:
    """One line per job for people: state, counts, rate, ETA."""
    parts = [f"{job.id}  {job.state:<11}", f"{job.accounted}/{job.total} lines"]
    parts.append(f"done {job.done} failed {job.failed} invalid {job.invalid}")
    if job.started_at:
        parts.append(f"{job.rate():.1f} lines/s")
    eta = job.eta_s()
    if eta is not None:
        parts.append(f"ETA {eta:.0f}s")
    parts.append(f"model {job.model}, {job.mode}")
    if job.error:
        parts.append(f"error: {job.error}")
    return ", ".join(parts)

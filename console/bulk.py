"""`inferq bulk` at the terminal: a progress bar while a job runs here, one line per job for `status` and `list`."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from inferq.producer.bulk.attached import BulkJob
from inferq.producer.bulk.detached import BulkJobs
from inferq.producer.bulk.state import JobRecord
from inferq.producer.client import InferenceClient
from inferq.producer.local import local_worker
from inferq.shared.settings import Settings


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


async def submit_job(settings: Settings, input_path: Path, model: str | None) -> None:
    """`inferq bulk submit`: stage the file, print the job id (stdout) and what was staged (stderr)."""
    async with InferenceClient(settings) as client:
        job = await BulkJobs(client).submit(input_path, model=model)
    print(f"bulk job {job.id}: {job.total} lines staged for model {job.model}", file=sys.stderr)
    print(job.id)


async def show_jobs(settings: Settings, job_id: str | None, *, limit: int = 1, as_json: bool) -> None:
    """`inferq bulk status JOB` (one job) or `inferq bulk list` (newest first): a line or a JSON object each."""
    async with InferenceClient(settings) as client:
        jobs = BulkJobs(client)
        found = [await jobs.get(job_id)] if job_id else await jobs.list(limit)
    for job in found:
        print(json.dumps(job.to_dict()) if as_json else describe_job(job))


async def cancel_job(settings: Settings, job_id: str) -> None:
    async with InferenceClient(settings) as client:
        print(await BulkJobs(client).cancel(job_id))


async def download_job(settings: Settings, job_id: str, output: Path, *, wait: bool) -> None:
    async with InferenceClient(settings) as client:
        job, lines = await BulkJobs(client).download(job_id, output, wait=wait)
    print(f"bulk job {job.id} {job.state}: {lines} lines in {output}", file=sys.stderr)


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

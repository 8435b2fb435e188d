"""Attached bulk jobs: a JSONL file through the queue, results to a JSONL file, resumable.

The job id comes from the input and output paths and the model, so running the same command again finds the
job: its state is in Redis (bulk.state), the feed resumes at its cursor (lines fed before are
never fed again, so a finished line never runs twice), and the output resumes at its line count. While the
job runs, a BulkRunner feeds and counts and the output writer follows the reply stream; both keep nothing
per line in memory, so memory stays flat however long the file is.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from inferq.producer.bulk.formats import LineError, duplicate, file_kind, parse_line, refused
from inferq.producer.bulk.inputs import FileLines, count_lines, numbered_lines
from inferq.producer.bulk.output import complete_lines, write_output
from inferq.producer.bulk.running import LEASE_S, BulkRunner
from inferq.producer.bulk.state import ATTACHED, CANCELLED, CANCELLING, COMPLETED, ENDED, BulkStore, JobRecord
from inferq.producer.client import InferenceClient
from inferq.shared.errors import InvalidRequest


def job_id(input_path: Path, output_path: Path, model: str) -> str:
    key = f"{input_path.resolve()}|{output_path.resolve()}|{model}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def runner_name(kind: str) -> str:
    return f"{kind}-{socket.gethostname()}-{os.getpid()}"


class BulkJob:
    def __init__(
        self,
        client: InferenceClient,
        input_path: Path,
        output_path: Path,
        *,
        model: str | None = None,
        strict: bool = False,
        on_progress: Callable[[JobRecord], None] = lambda job: None,
    ) -> None:
        self.client = client
        self.input_path = input_path
        self.output_path = output_path
        self.model = model or client.settings.model
        self.strict = strict
        self.on_progress = on_progress
        self.id = job_id(input_path, output_path, self.model)
        self.store = BulkStore(client.redis, client.keys, client.settings.bulk_ttl_s)
        self.resumed = 0  # output lines that were there when this run started

    @functools.cached_property
    def format(self) -> str:
        """The input file's format: the shape of every output record (formats.file_kind)."""
        return file_kind(numbered_lines(self.input_path))

    async def run(self) -> JobRecord:
        if not self.input_path.is_file():
            raise InvalidRequest(f"input file {self.input_path} does not exist")
        job = await self._open()
        if job.state in ENDED:
            return job  # finished before; the output has every line
        runner = BulkRunner(
            self.client, self.store, job, FileLines(self.input_path), name=runner_name("attached"),
            on_progress=self.on_progress,
        )  # fmt: skip
        self.on_progress(job)
        ended = asyncio.Event()
        writing = asyncio.create_task(
            write_output(self.store, self.id, self.output_path, until=ended), name=f"inferq-bulk-out-{self.id}"
        )
        try:
            job = await runner.run(wait_s=LEASE_S + 1)  # a killed earlier run's lease lapses meanwhile
        except BaseException:
            writing.cancel()
            await asyncio.gather(writing, return_exceptions=True)
            raise
        ended.set()
        await writing
        final = CANCELLED if job.state == CANCELLING else COMPLETED
        await self.store.finish(self.id, final, keep_output=False)  # every record is in the output now
        job.state = final
        self.on_progress(job)
        return job

    async def _open(self) -> JobRecord:
        """The job to run: an unfinished one resumed, or a new one; refuses to append to an output file that
        no unfinished job of these paths writes to."""
        existing = await self.store.get(self.id)
        written = complete_lines(self.output_path)
        self.resumed = written
        if existing is not None and existing.state not in ENDED:
            return existing
        if existing is not None and written == existing.accounted:
            return existing  # already complete: nothing to do
        if written:
            raise InvalidRequest(
                f"{self.output_path} has {written} lines already and no unfinished job writes to it; "
                "remove it or choose another output file"
            )
        if self.strict:
            await self._check_all()
        job = JobRecord(
            id=self.id, mode=ATTACHED, model=self.model, epoch=(existing.epoch + 1) if existing else 0,
            input=str(self.input_path.resolve()), output=str(self.output_path.resolve()),
            total=count_lines(self.input_path), format=self.format, created_at=time.time(),
        )  # fmt: skip
        await self.store.create(job)
        return job

    async def _check_all(self) -> None:
        """--strict: every line valid, no custom_id twice; else refuse the file, listing the bad lines. The
        duplicate check uses a Redis hash, not memory."""
        scratch = f"{self.id}-check"
        bad: list[str] = []
        try:
            batch: list[tuple[str, int]] = []
            for number, raw in numbered_lines(self.input_path):
                line = parse_line(number, raw, self.model, self.format)
                if isinstance(line, LineError):
                    bad.append(line.message)
                else:
                    try:
                        self.client.build_request(**line.params)
                    except InvalidRequest as exc:
                        bad.append(refused(line, exc).message)
                batch.append((line.custom_id, number))
                if len(batch) >= 1000:
                    bad += await self._duplicates(scratch, batch)
                    batch = []
            bad += await self._duplicates(scratch, batch)
        finally:
            await self.client.redis.delete(self.client.keys.bulk_ids(scratch))
        if bad:
            shown = "\n  ".join(bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise InvalidRequest(f"{len(bad)} bad line(s) in {self.input_path}, nothing enqueued:\n  {shown}{more}")

    async def _duplicates(self, scratch: str, batch: list[tuple[str, int]]) -> list[str]:
        firsts = await self.store.first_lines(scratch, batch)
        return [duplicate(n, c, "", first).message for (c, n), first in zip(batch, firsts, strict=True) if first != n]

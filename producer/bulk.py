"""Attached bulk jobs (issue 5): a JSONL file through the queue, results to a JSONL file, resumable.

The input is streamed: each line is parsed (producer.bulk_format) and validated by the client's own rules;
a bad line becomes an error record at once and the rest of the job runs (`strict` refuses the whole file
up front instead). Requests ask for no token events and name the job's reply stream, where each worker
appends the final record in the same step as its ack, so completions are read durably, in any order.
Admission waits when the queue is full (backpressure), never errors out. At most `window` requests are
outstanding at a time.

Resume: the job id is derived from the input and output paths and the model, and each request id from the
job id and the line's custom_id. Re-running the same job skips lines already in the output, re-submits the
rest under the same ids (already queued or finished ones are not added again: admission is idempotent) and
reads the reply stream from its start, so completions that landed while no collector ran are written too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from producer.admission import ADMITTED, EXISTS
from producer.bulk_format import BulkLine, LineError, error_record, output_record, parse_line
from producer.client import InferenceClient
from shared.codec import text, unpack
from shared.errors import InvalidRequest
from shared.schemas import GenerationRequest

_SUBMIT_BATCH = 256


@dataclass
class BulkProgress:
    total: int = 0  # lines in the input
    skipped: int = 0  # already in the output (resumed)
    done: int = 0
    failed: int = 0  # requests that ended other than done
    invalid: int = 0  # lines that never became a request
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.skipped + self.done + self.failed + self.invalid


def job_id(input_path: Path, output_path: Path, model: str) -> str:
    key = f"{input_path.resolve()}|{output_path.resolve()}|{model}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def written_ids(output_path: Path) -> set[str]:
    """custom_ids already in the output; a last line cut off by a crash is removed first."""
    if not output_path.exists():
        return set()
    with open(output_path, "rb+") as fh:
        data = fh.read()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            fh.truncate(complete)
    ids = set()
    for line in data[:complete].splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            ids.add(json.loads(line)["custom_id"])
    return ids


def _duplicate(number: int, line: BulkLine | LineError, seen: dict[str, int]) -> LineError:
    message = f"line {number}: duplicate custom_id {line.custom_id!r} (first on line {seen[line.custom_id]})"
    return LineError(number, line.custom_id, line.kind, message)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                yield number, line


class BulkJob:
    def __init__(
        self,
        client: InferenceClient,
        input_path: Path,
        output_path: Path,
        *,
        model: str | None = None,
        strict: bool = False,
        window: int = 4096,
        on_progress: Callable[[BulkProgress], None] = lambda p: None,
    ) -> None:
        self.client = client
        self.input_path = input_path
        self.output_path = output_path
        self.model = model or client.settings.model
        self.strict = strict
        self.window = window
        self.on_progress = on_progress
        self.id = job_id(input_path, output_path, self.model)
        self.reply_stream = client.keys.done(self.id)
        self.progress = BulkProgress()
        self._pending: dict[str, BulkLine] = {}  # request id -> its line, until its record is written
        self._early: dict[str, dict[str, Any]] = {}  # records read before their line was (on resume)
        self._room = asyncio.Event()
        self._out: TextIO | None = None

    def request_id(self, custom_id: str) -> str:
        return f"bulk-{self.id}-{hashlib.sha256(custom_id.encode()).hexdigest()[:24]}"

    async def run(self) -> BulkProgress:
        if not self.input_path.exists():
            raise InvalidRequest(f"input file {self.input_path} does not exist")
        if self.strict:
            self._check_all()
        written = await asyncio.to_thread(written_ids, self.output_path)
        self.progress.total = sum(1 for _ in _lines(self.input_path))
        # Local file I/O, a line at a time, stays on the loop: it is short next to a Redis round trip.
        with open(self.output_path, "a", encoding="utf-8") as self._out:  # noqa: ASYNC230
            collector = asyncio.create_task(self._collect(), name=f"inferq-bulk-{self.id}")
            try:
                await self._feed(written, collector)
                while self._pending:
                    await self._wait_for_room(collector)
            finally:
                collector.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collector
        await self.client.redis.delete(self.reply_stream)  # every record is in the output now
        self.on_progress(self.progress)
        return self.progress

    def _check_all(self) -> None:
        bad = []
        seen: dict[str, int] = {}
        for number, raw in _lines(self.input_path):
            parsed = self._parse(number, raw)
            if isinstance(parsed, LineError):
                bad.append(parsed.message)
            elif parsed[0].custom_id in seen:
                bad.append(_duplicate(number, parsed[0], seen).message)
            else:
                seen[parsed[0].custom_id] = number
        if bad:
            shown = "\n  ".join(bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise InvalidRequest(f"{len(bad)} bad line(s) in {self.input_path}, nothing enqueued:\n  {shown}{more}")

    def _parse(self, number: int, text: str) -> BulkLine | LineError | tuple[BulkLine, GenerationRequest]:
        line = parse_line(number, text, self.model)
        if isinstance(line, LineError):
            return line
        try:
            request = self.client.build_request(
                request_id=self.request_id(line.custom_id), stream=False, reply_stream=self.reply_stream,
                **line.params,
            )  # fmt: skip
        except InvalidRequest as exc:
            return LineError(number, line.custom_id, line.kind, f"line {number} ({line.custom_id}): {exc}")
        return line, request

    async def _feed(self, written: set[str], collector: asyncio.Task[None]) -> None:
        seen: dict[str, int] = {}
        batch: list[tuple[BulkLine, GenerationRequest]] = []
        for number, raw in _lines(self.input_path):
            parsed = self._parse(number, raw)
            custom_id = parsed.custom_id if isinstance(parsed, LineError) else parsed[0].custom_id
            if custom_id in written:
                self.progress.skipped += 1
                continue
            if custom_id in seen:
                parsed = _duplicate(number, parsed if isinstance(parsed, LineError) else parsed[0], seen)
            seen.setdefault(custom_id, number)
            if isinstance(parsed, LineError):
                self._write(error_record(parsed))
                self.progress.invalid += 1
                continue
            batch.append(parsed)
            if len(batch) >= _SUBMIT_BATCH:
                await self._submit(batch, collector)
                batch = []
        if batch:
            await self._submit(batch, collector)

    async def _wait_for_room(self, collector: asyncio.Task[None]) -> None:
        """Until a completion was written (or a second passed); re-raises if the collector died."""
        if collector.done():
            collector.result()
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), 1.0)

    async def _submit(self, batch: list[tuple[BulkLine, GenerationRequest]], collector: asyncio.Task[None]) -> None:
        while len(self._pending) + len(batch) > self.window:  # bounded memory: wait for completions
            await self._wait_for_room(collector)
        for line, request in batch:
            self._pending[request.id] = line
        todo = [request for _, request in batch]
        while todo:  # a full queue is waited out, never an error
            admissions = await self.client.enqueue_many(todo)
            refused = [r for r, a in zip(todo, admissions, strict=True) if a.code not in (ADMITTED, EXISTS)]
            if refused:
                await asyncio.sleep(random.uniform(0.2, 1.0))
            todo = refused
        for request_id in [r.id for _, r in batch if r.id in self._early]:
            self._record(request_id, self._early.pop(request_id))

    async def _collect(self) -> None:
        last = "0-0"  # from the start: on resume, completions that landed meanwhile are in there
        while True:
            reply = await self.client.redis.xread({self.reply_stream: last}, count=512, block=1000)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = text(entry_id)
                    record = unpack(fields[b"m"])
                    if record["id"] in self._pending:
                        self._record(record["id"], record)
                    else:
                        self._early[record["id"]] = record

    def _record(self, request_id: str, record: dict[str, Any]) -> None:
        line = self._pending.pop(request_id, None)
        if line is None:
            return
        self._write(output_record(line, line.params.get("model", self.model), record))
        if record.get("status") == "done":
            self.progress.done += 1
        else:
            self.progress.failed += 1
        self.progress.tokens += int(record.get("completion_tokens", 0))
        self._room.set()
        self.on_progress(self.progress)

    def _write(self, record: dict[str, Any]) -> None:
        assert self._out is not None
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()

"""A bulk job's output file: its reply stream, in order, one output line per record.

The output is always a prefix of the reply stream, so writing resumes by counting the lines already in the
file (a last line cut off by a crash is removed first) and skipping that many records: no custom_id is held
in memory, and no line is written twice. Attached jobs follow the stream while the job runs; `inferq bulk
download` writes what a detached job left."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from inferq.producer.bulk.formats import SIMPLE, BulkLine, LineError, error_record, output_record, read_tag
from inferq.producer.bulk.state import BulkStore
from inferq.shared import aio


def complete_lines(path: Path) -> int:
    """Lines in `path` that end in a newline; a partial last line (a crash mid-write) is cut off."""
    if not path.exists():
        return 0
    count = last_end = 0
    with open(path, "rb+") as fh:
        while True:
            start = fh.tell()
            block = fh.read(1 << 20)
            if not block:
                break
            if (n := block.count(b"\n")) > 0:
                count += n
                last_end = start + block.rindex(b"\n") + 1
        if fh.tell() != last_end:
            fh.truncate(last_end)
    return count


def to_output(record: dict[str, Any], tag_defaults: tuple[str, str]) -> dict[str, Any]:
    """A reply-stream record (a request's final record, or a line's error record) as its output line;
    `tag_defaults`: its job's (JobRecord.tag_defaults)."""
    number, kind, endpoint, model, custom_id = read_tag(record["tag"], tag_defaults)
    if record.get("status") == "invalid":
        return error_record(LineError(number, custom_id, kind, str(record.get("error", ""))))
    return output_record(BulkLine(number, custom_id, kind, endpoint, {}), model, record)


async def write_output(
    store: BulkStore,
    job: str,
    path: Path,
    *,
    until: asyncio.Event | None = None,
) -> int:
    """Append the job's records that `path` lacks; returns the lines in `path` after. With `until`, follow
    the stream: keep writing new records until the event is set and none are left."""
    written = skip = complete_lines(path)
    after = "0-0"
    job_record = await store.get(job)
    tag_defaults = job_record.tag_defaults if job_record is not None else (SIMPLE, "")
    with open(path, "a", encoding="utf-8") as out:  # noqa: ASYNC230 - a line at a time, short next to Redis
        while True:
            records = await _next(store, job, after, until)
            if not records and (until is None or until.is_set()):
                return written
            for entry_id, record in records:
                after = entry_id
                if skip:
                    skip -= 1
                    continue
                out.write(json.dumps(to_output(record, tag_defaults), ensure_ascii=False) + "\n")
                written += 1
            out.flush()


async def _next(store: BulkStore, job: str, after: str, until: asyncio.Event | None) -> list[tuple[str, Any]]:
    """The next records; while following, wait for some, or for `until` (then read what is left at once)."""
    if until is not None and not until.is_set():
        records = await aio.unless(until, store.records(job, after, block_ms=5000))
        if records is not None:
            return records
    return await store.records(job, after)

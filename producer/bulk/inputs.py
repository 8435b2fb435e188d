"""Where a bulk job's input lines come from, a batch at a time, starting from any line: a local file
(attached jobs) or the chunks staged in Redis (detached jobs, so that any runner can read them)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from itertools import islice
from pathlib import Path
from typing import Protocol

from inferq.producer.bulk.state import CHUNK_LINES, BulkStore
from inferq.shared.errors import InferqError, InvalidRequest

Numbered = tuple[int, str]  # (1-based line number in the file, the line)


class LineSource(Protocol):
    def batches(self, start: int, size: int) -> AsyncIterator[list[Numbered]]:
        """Batches of at most `size` non-blank lines, from the `start`-th (0-based) non-blank line on."""
        ...


def numbered_lines(path: Path) -> Iterator[Numbered]:
    if not path.is_file():
        raise InvalidRequest(f"input file {path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                yield number, line


def count_lines(path: Path) -> int:
    """Non-blank lines: each one gets exactly one output record."""
    return sum(1 for _ in numbered_lines(path))


class FileLines:
    def __init__(self, path: Path) -> None:
        self.path = path

    async def batches(self, start: int, size: int) -> AsyncIterator[list[Numbered]]:
        # Local file reads, a batch at a time, stay on the loop: short next to the Redis round trips per batch.
        lines = islice(numbered_lines(self.path), start, None)
        while batch := list(islice(lines, size)):
            yield batch


class StagedLines:
    def __init__(self, store: BulkStore, job: str, chunks: int) -> None:
        self.store, self.job, self.chunks = store, job, chunks

    async def batches(self, start: int, size: int) -> AsyncIterator[list[Numbered]]:
        number, skip = divmod(start, CHUNK_LINES)
        for n in range(number, self.chunks):
            chunk = await self.store.chunk(self.job, n)
            if chunk is None:
                raise InferqError(f"bulk job {self.job}: staged input chunk {n} is missing (expired or deleted)")
            chunk = chunk[skip:]
            skip = 0
            for i in range(0, len(chunk), size):
                yield chunk[i : i + size]


async def stage(store: BulkStore, job: str, path: Path) -> tuple[int, int]:
    """Copy the input file into Redis, CHUNK_LINES lines per chunk; returns (lines, chunks)."""
    lines = chunks = 0
    pending: list[list[Numbered]] = []
    source = numbered_lines(path)
    while chunk := list(islice(source, CHUNK_LINES)):
        pending.append(chunk)
        lines += len(chunk)
        if len(pending) == 16:  # ~16k lines per round trip, a few MB at most
            await store.stage(job, pending, chunks)
            chunks += len(pending)
            pending = []
    if pending:
        await store.stage(job, pending, chunks)
        chunks += len(pending)
    return lines, chunks

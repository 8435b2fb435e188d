"""One queue entry a worker owns, from its read to its acknowledgement."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from inferq.shared.batching import Ticket
from inferq.shared.schemas import GenerationRequest
from inferq.worker.requests import Generation


@dataclass(eq=False)
class Job:
    """One entry this worker owns, from read to ack."""

    stream: str
    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int
    task: asyncio.Task[None] | None = None
    request: GenerationRequest | None = None
    # "cancelled", "expired", "failed" (the watchdog) or "refused" (its token events) once interrupted on purpose
    stop_reason: str | None = None
    error: str | None = None  # why, when it was stopped as `failed` or `refused`
    interruptible: bool = False  # True while it starts or generates; the final write is never interrupted
    gen: Generation = field(default_factory=Generation)  # what it produced so far
    start: Ticket | None = None  # its start, queued in the outbox and not awaited (consumer._run), if so

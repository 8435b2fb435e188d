"""The dead-letter stream `{p}:dlq:{model}` (docs/CONTRACTS.md, "Delivery"): list, show, retry, purge.

A worker dead-letters an entry it cannot decode or validate, one the engine refused or failed on, and one
delivered more than `max_deliveries` times; the request's stored result is then `failed` with the reason.
Retrying re-enqueues the original payload through the admission script (the cap applies) and removes the
dead letter in the same atomic step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from inferq.producer.admission import EXISTS, REFUSED, TENANT_FULL, Admitter
from inferq.shared.codec import text, unpack
from inferq.shared.connection import redis_errors
from inferq.shared.errors import BadPayload, InvalidRequest, QueueFull, RequestNotFound
from inferq.shared.keys import Keys
from inferq.shared.schemas import GenerationRequest


@dataclass(frozen=True)
class DeadLetter:
    id: str  # the entry id in the DLQ stream
    error: str
    deliveries: int
    stream: str  # the lane stream it came from
    entry_id: str  # its id there
    failed_at: float
    worker: str
    payload: bytes  # the original entry, as the producer wrote it ('' if it was over dlq_max_payload_bytes)
    payload_bytes: int  # its size, kept or not

    @property
    def request(self) -> GenerationRequest | None:
        """The original request, or None if the payload is not a valid one (it is poison)."""
        try:
            return GenerationRequest.from_payload(unpack(self.payload))
        except BadPayload:
            return None

    def summary(self) -> dict[str, Any]:
        request = self.request
        return {
            "id": self.id,
            "request_id": request.id if request else None,
            "error": self.error,
            "deliveries": self.deliveries,
            "stream": self.stream,
            "entry_id": self.entry_id,
            "failed_at": self.failed_at,
            "worker": self.worker,
            "payload_bytes": self.payload_bytes,
            "payload_kept": len(self.payload) == self.payload_bytes,
        }

    @classmethod
    def from_entry(cls, entry_id: Any, fields: dict[bytes, bytes]) -> DeadLetter:
        def get(name: str) -> str:
            return fields.get(name.encode(), b"").decode(errors="replace")

        return cls(
            id=text(entry_id),
            error=get("error"),
            deliveries=int(get("deliveries") or 0),
            stream=get("stream"),
            entry_id=get("entry_id"),
            failed_at=float(get("failed_at") or 0),
            worker=get("worker"),
            payload=fields.get(b"payload", b""),
            payload_bytes=int(get("payload_bytes") or len(fields.get(b"payload", b""))),
        )


class DeadLetters:
    def __init__(self, redis: Redis, keys: Keys, admitter: Admitter, model: str) -> None:
        self.redis = redis
        self.key = keys.dlq(model)
        self.model = model
        self._admitter = admitter

    @redis_errors("read dead letters")
    async def size(self) -> int:
        return int(await self.redis.xlen(self.key))

    @redis_errors("read dead letters")
    async def list(self, count: int = 100, after: str = "-") -> list[DeadLetter]:
        """The oldest `count` dead letters (after the id `after`, exclusive, to page on)."""
        start = after if after == "-" else f"({after}"
        entries = await self.redis.xrange(self.key, min=start, count=count)
        return [DeadLetter.from_entry(eid, fields) for eid, fields in entries]

    @redis_errors("read dead letters")
    async def show(self, dead_letter_id: str) -> DeadLetter:
        entries = await self.redis.xrange(self.key, min=dead_letter_id, max=dead_letter_id)
        if not entries:
            raise RequestNotFound(f"no dead letter {dead_letter_id!r} in {self.key}; `inferq dlq list` shows them")
        return DeadLetter.from_entry(*entries[0])

    @redis_errors("retry a dead letter")
    async def retry(self, dead_letter_id: str) -> str:
        """Enqueue the original request again (its failed result is replaced); returns its request id."""
        letter = await self.show(dead_letter_id)
        request = letter.request
        if request is None and letter.payload_bytes > len(letter.payload):
            raise InvalidRequest(
                f"dead letter {dead_letter_id} cannot be retried: its request of {letter.payload_bytes:,} bytes was "
                "not kept (over INFERQ_DLQ_MAX_PAYLOAD_BYTES); `inferq dlq purge` drops it"
            )
        if request is None:
            raise InvalidRequest(
                f"dead letter {dead_letter_id} cannot be retried: its payload is not a valid request "
                f"({letter.error}). Fix the producer that wrote it; `inferq dlq purge` drops it"
            )
        admission = await self._admitter.admit(request, replacing_dead_letter=dead_letter_id)
        if admission.code == EXISTS:
            raise InvalidRequest(
                f"dead letter {dead_letter_id} was not retried: it was retried already, or request {request.id} "
                "has a result other than `failed` now (`inferq result` shows it)"
            )
        if admission.code in (REFUSED, TENANT_FULL):
            retry_after, note = await self._admitter.retry_after(request, admission)
            raise QueueFull(request.model, admission.queue_len, admission.lag, retry_after, note=note)
        return request.id

    @redis_errors("purge dead letters")
    async def purge(self) -> int:
        """Drop every dead letter; returns how many there were. Their `failed` results stay until they expire."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xlen(self.key)
            pipe.delete(self.key)
            count, _ = await pipe.execute()
        return int(count)

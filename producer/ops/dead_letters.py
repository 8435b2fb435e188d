"""The dead-letter streams of a model, one per shard (docs/CONTRACTS.md, "Delivery"): list, show, retry, purge.

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
from inferq.shared.connection import pipeline, redis_errors
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
    def from_entry(cls, entry_id: Any, fields: dict[bytes, bytes], where: str = "") -> DeadLetter:
        def get(name: str) -> str:
            return fields.get(name.encode(), b"").decode(errors="replace")

        return cls(
            id=text(entry_id) + where,
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
    """The model's dead letters over all its shards. With more than one shard a letter's id names its shard
    (`ENTRY_ID@SHARD`), and the letters are listed in the order they failed."""

    def __init__(self, redis: Redis, keys: Keys, admitter: Admitter, model: str) -> None:
        self.redis = redis
        self.keys = keys
        self.streams = [keys.dlq(model, shard) for shard in range(keys.shards)]
        self.model = model
        self._admitter = admitter

    def _suffix(self, shard: int) -> str:
        return f"@{shard}" if len(self.streams) > 1 else ""

    def _where(self, dead_letter_id: str) -> tuple[int, str]:
        """(shard, entry id) of a letter's id."""
        entry, _, shard = dead_letter_id.partition("@")
        if len(self.streams) == 1 and not shard:
            return 0, entry
        if not shard.isdigit() or int(shard) >= len(self.streams):
            raise RequestNotFound(
                f"no dead letter {dead_letter_id!r}: with {len(self.streams)} shards its id is ENTRY_ID@SHARD "
                "(`inferq dlq list` shows them)"
            )
        return int(shard), entry

    @redis_errors("read dead letters")
    async def size(self) -> int:
        return sum([int(await self.redis.xlen(stream)) for stream in self.streams])

    @redis_errors("read dead letters")
    async def list(self, count: int = 100, after: str = "-") -> list[DeadLetter]:
        """The oldest `count` dead letters (after the id `after`, exclusive, to page on), over every shard."""
        found: list[tuple[tuple[int, int, int], DeadLetter]] = []
        after_shard, after_entry = (0, "-") if after == "-" else self._where(after)
        for shard, stream in enumerate(self.streams):
            # Letters are ordered by (entry id, shard): past `after`'s entry id in a later shard, after it here
            start = "-" if after == "-" else after_entry if shard > after_shard else f"({after_entry}"
            for eid, fields in await self.redis.xrange(stream, min=start, count=count):
                ms, _, seq = text(eid).partition("-")
                found.append(((int(ms), int(seq), shard), DeadLetter.from_entry(eid, fields, self._suffix(shard))))
        return [letter for _, letter in sorted(found, key=lambda pair: pair[0])[:count]]

    @redis_errors("read dead letters")
    async def show(self, dead_letter_id: str) -> DeadLetter:
        shard, entry = self._where(dead_letter_id)
        entries = await self.redis.xrange(self.streams[shard], min=entry, max=entry)
        if not entries:
            raise RequestNotFound(
                f"no dead letter {dead_letter_id!r} of model {self.model!r}; `inferq dlq list` shows them"
            )
        return DeadLetter.from_entry(*entries[0], self._suffix(shard))

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
        shard, entry = self._where(dead_letter_id)
        if self.keys.shard_of(request.id) != shard:
            raise InvalidRequest(
                f"dead letter {dead_letter_id} cannot be retried: request {request.id} belongs to shard "
                f"{self.keys.shard_of(request.id)}, and its entry was forged into this one; `inferq dlq purge` drops it"
            )
        admission = await self._admitter.admit(request, replacing_dead_letter=entry)
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
        count = 0
        for stream in self.streams:
            async with pipeline(self.redis, atomic=True) as pipe:
                pipe.xlen(stream)
                pipe.delete(stream)
                n, _ = await pipe.execute()
            count += int(n)
        return count

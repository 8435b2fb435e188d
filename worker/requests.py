"""How a request ends, written to Redis: the stored result, the ack + delete, the reply-stream record and
the final token event, all in one transaction through the outbox (docs/CONTRACTS.md, "Delivery")."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from inferq.shared.batching import Ticket
from inferq.shared.codec import pack, text
from inferq.shared.connection import is_cluster
from inferq.shared.keys import GROUP, Keys
from inferq.shared.schemas import SCHEMA_VERSION, GenerationRequest
from inferq.shared.settings import Settings
from inferq.worker import scripts
from inferq.worker.engine import Delta
from inferq.worker.metrics import WorkerMetrics, queued_at
from inferq.worker.outbox import Event, Outbox

log = logging.getLogger("inferq.requests")
# finish.lua's final-event arguments when it sends none (no reply channel; on a cluster the outbox sends it)
_NOT_FROM_FINISH = ["", "", "", ""]
FORGED = 2  # finish.lua's code for an entry that is not the one its request was admitted with


@dataclass
class Generation:
    """What one run of a request produced so far: enough to end it `done`, or `cancelled`/`expired` with
    the partial text."""

    parts: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    started_at: float | None = None  # when it started running (None: it never ran)
    first_token_at: float | None = None
    finish_reason: str | None = None
    last: Delta | None = None  # the final delta, sent with the final event
    seq: int = 0  # the next token event's seq
    run: dict[str, str] | None = None  # what start.lua stored for this run (None: it did not start in this run)

    def add(self, delta: Delta) -> bool:
        """Take one step's delta; True if it is the last one."""
        if self.first_token_at is None:
            self.first_token_at = time.time()
        self.parts.append(delta.text)
        self.completion_tokens += len(delta.token_ids)
        self.prompt_tokens = delta.prompt_tokens
        if delta.finished:
            self.finish_reason, self.last = delta.finish_reason, delta
        return delta.finished

    def event(self, request_id: str, delta: Delta) -> dict[str, Any]:
        """The token event of one (not final) step; numbers it."""
        event = {"id": request_id, "seq": self.seq, "text": delta.text, "token_ids": delta.token_ids}
        self.seq += 1
        return event


# What a request cancelled while it was queued ends with: it never ran (cancel.lua stored its state).
CANCELLED_WHILE_QUEUED: dict[str, Any] = {
    "status": "cancelled", "finish_reason": "cancelled", "text": "", "prompt_tokens": 0, "completion_tokens": 0,
}  # fmt: skip


def reply_record(request: GenerationRequest, outcome: dict[str, Any]) -> bytes:
    """The one record a request leaves in its reply stream (a bulk job's output line is made from it)."""
    record: dict[str, Any] = {"v": SCHEMA_VERSION, "id": request.id, **outcome}
    if request.tag is not None:
        record["tag"] = request.tag  # the bulk job's note on which line this was
    return pack(record)


class RequestWriter:
    def __init__(
        self, outbox: Outbox, keys: Keys, settings: Settings, worker_name: str, model: str, metrics: WorkerMetrics
    ) -> None:
        self.outbox = outbox
        self.metrics = metrics
        self.model = model
        self.keys = keys
        self.settings = settings
        self.worker_name = worker_name

    async def end(
        self,
        stream: str,
        entry_id: str,
        request: GenerationRequest,
        status: str,
        gen: Generation,
        *,
        error: str | None = None,
        dead_letter: tuple[Any, ...] = (),
        start: Ticket | None = None,
    ) -> int:
        """Store the final state (unless an earlier delivery stored one: finish.lua), ack and delete the entry,
        append to the reply stream (and with `dead_letter`, the DLQ entry's fields, to the DLQ), send the final
        event. `start`: the run's start, queued in the outbox and not awaited; if it has not gone out yet, this
        write makes it instead (its fields are gen.run's). Returns once Redis has it all, with finish.lua's
        code: 1 stored, 0 stored before, 2 a forged entry (only it was acknowledged)."""
        now = time.time()
        finish_reason = (gen.finish_reason or "stop") if status == "done" else ("error" if error else status)
        record: dict[str, Any] = {
            "status": status,
            "text": "".join(gen.parts),
            "finish_reason": finish_reason,
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens,
            "finished_at": repr(now),
        }
        if gen.first_token_at is not None:
            record["first_token_at"] = repr(gen.first_token_at)
        if error:
            record["error"] = error
        # The consumer ends only requests read from their own shard's stream: every key here shares its slot.
        shard = self.keys.shard_of(request.id)
        keys = [self.keys.result(request.id), stream, self.keys.tenants(request.model, shard), *self._dlq(shard)]
        durable = cancelled = b""
        if request.reply_stream:
            keys.append(request.reply_stream)
            durable, cancelled = reply_record(request, record), reply_record(request, CANCELLED_WHILE_QUEUED)
        line = self.keys.bulk_line(request.id)  # a bulk line that never started: its entry is in the id hash
        if line is not None:
            keys.append(line[0])
        stored = {name: str(value) for name, value in record.items()}
        fields = [x for kv in stored.items() for x in kv]
        # Taken back now, or by an earlier final write of this run that Redis refused: this write makes the start.
        starting = (
            start is not None
            and gen.run is not None
            and (self.outbox.withdraw(start) or self.outbox.was_withdrawn(start))
        )
        if starting and gen.run is not None:  # its attempt is counted by finish.lua, as start.lua counts it
            fields += [x for name, value in gen.run.items() if name != "attempts" for x in (name, value)]
        announce, events = self._final_event(request, status, finish_reason, gen, stored, error)
        finish = scripts.FINISH.command(
            keys,
            [GROUP, entry_id, self.settings.result_ttl_s, durable, self.worker_name, request.tenant or "", cancelled,
             self.settings.dlq_max_len, len(fields), line[1] if line else "", *announce, "1" if starting else "",
             *fields, *dead_letter],
        )  # fmt: skip
        reply = await self.outbox.add(finish, events=events)
        if len(reply) > 1:  # Redis refused the final event (finish.lua); the rest is written
            log.error("redis refused the final event of request %s to %s (its client reads the stored result): %s",
                      request.id, request.reply_channel, text(reply[1]))  # fmt: skip
        self.metrics.finished(stream, entry_id, status, gen.prompt_tokens, gen.completion_tokens)
        if self.settings.log_requests:
            self._log_end(stream, entry_id, request.id, status, gen, now, error)
        return int(reply[0])

    def _final_event(
        self,
        request: GenerationRequest,
        status: str,
        finish_reason: str,
        gen: Generation,
        stored: dict[str, str],
        error: str | None,
    ) -> tuple[list[Any], tuple[Event, ...]]:
        """finish.lua's arguments for the final event (the reply channel, the event carrying the stored result, the
        `started_at` of this run, the event without the result), and what the outbox sends itself: on a cluster,
        the event, after the writes (see worker/outbox.py)."""
        streaming = request.publishes
        last = gen.last if streaming and status == "done" else None
        event = {
            "id": request.id,
            # seq -1 on failures: the client cannot match it to the events it saw, so it reads the stored result
            "seq": -1 if error else gen.seq if streaming else 0,
            "text": last.text if last else "",
            "token_ids": last.token_ids if last else [],
            "finished": True,
            "finish_reason": finish_reason,
            "status": status,
        }
        channel = request.reply_channel
        if not channel:
            return _NOT_FROM_FINISH, ()
        if is_cluster(self.outbox.redis):
            return _NOT_FROM_FINISH, ((channel, event),)
        bare = pack(event)  # finish.lua frames it, with the other final events of its call to this channel
        if gen.run is None or request.stream:  # a streamed request's client has its text already
            return [channel, "", "", bare], ()
        # The whole stored result: what this run's start stored, and what this call stores. The bare event goes
        # instead in the rare case it may not be told (a takeover, a duplicate).
        told = pack({**event, "result": {**gen.run, **stored}})
        return [channel, told, gen.run["started_at"], bare], ()

    def _log_end(
        self, stream: str, entry_id: str, request_id: str, status: str, gen: Generation, now: float, error: str | None
    ) -> None:
        """One line per request that ends (INFERQ_LOG_REQUESTS), its numbers as fields for `--log-format json`."""
        added = queued_at(entry_id)
        fields: dict[str, Any] = {
            "request_id": request_id, "model": self.model, "lane": self.metrics.of(stream).lane,
            "worker": self.worker_name, "status": status, "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens, "total_s": round(now - added, 4),
        }  # fmt: skip
        if gen.started_at is not None:
            fields["queued_s"] = round(gen.started_at - added, 4)
            fields["run_s"] = round(now - gen.started_at, 4)
            if gen.first_token_at is not None:
                fields["ttft_s"] = round(gen.first_token_at - added, 4)
        level = logging.WARNING if error else logging.INFO
        log.log(level, "request %s %s: %d tokens in %.3f s%s", request_id, status, gen.completion_tokens,
                fields["total_s"], f" ({error})" if error else "", extra={"inferq": fields})  # fmt: skip

    def _dlq(self, shard: int) -> list[str]:
        return [self.keys.dlq(self.model, shard), self.keys.dlq_dropped(self.model, shard)]

    async def dead_letter(
        self,
        stream: str,
        entry_id: str,
        fields: dict[bytes, bytes],
        error: str,
        deliveries: int,
        request: GenerationRequest | None,
        *,
        start: Ticket | None = None,
        run: dict[str, str] | None = None,
    ) -> None:
        """Poison input, a request the engine refused, or one delivered too often: to the DLQ with the reason,
        stored `failed`, acknowledged. An entry without even a usable id has no result to store. `start` and
        `run`: a start not awaited, and what it stores (see end)."""
        payload = fields.get(b"m", b"")
        kept = payload if len(payload) <= self.settings.dlq_max_payload_bytes else b""  # the reason is always kept
        dead = (
            "payload", kept, "payload_bytes", len(payload), "error", error, "stream", stream, "entry_id", entry_id,
            "deliveries", deliveries, "failed_at", repr(time.time()), "worker", self.worker_name,
        )  # fmt: skip
        if request is None:
            bound = self.settings.dlq_max_len
            keys = [*self._dlq(self.keys.shard_of_key(stream) or 0), stream]
            await self.outbox.add(scripts.DEAD_LETTER.command(keys, [bound, GROUP, entry_id, *dead]))
            self.metrics.of(stream).bad_entries.inc()
            return
        await self.end(stream, entry_id, request, "failed", Generation(run=run), error=error, dead_letter=dead,
                       start=start)  # fmt: skip

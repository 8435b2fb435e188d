"""Running a bulk job: feed its input lines into the queue and count the records that come back, under the
job's lease, so exactly one process moves a job at a time and any process can take it over.

Feeding goes a batch at a time: parse and validate each line (bulk.formats, the client's own
rules), find duplicate custom_ids in Redis, admit the valid requests (a full queue is waited out, never an
error; admission is idempotent, so a batch replayed after a crash adds nothing twice), then commit the
batch: its error records and the feed cursor in one script call. Counting reads the job's reply stream in
order and commits the counts with the stream position. At most `window` requests are outstanding.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from inferq.producer.admission import ADMITTED, EXISTS
from inferq.producer.bulk import formats
from inferq.producer.bulk.formats import SIMPLE, BulkLine, LineError, duplicate, parse_line, refused
from inferq.producer.bulk.inputs import LineSource, Numbered
from inferq.producer.bulk.state import CANCELLING, FINALIZING, IN_PROGRESS, VALIDATING, BulkStore, JobRecord, digest
from inferq.producer.client import InferenceClient
from inferq.shared.codec import text
from inferq.shared.errors import InferqError, InvalidRequest
from inferq.shared.keys import bulk_request_id
from inferq.shared.schemas import SCHEMA_VERSION, GenerationRequest

BATCH = 256
LEASE_S = 10.0  # a dead runner's lease lapses after this; a live one renews it every LEASE_S / 4


class JobBusy(InferqError):
    """Another process holds the job's lease."""


class LeaseLost(InferqError):
    """The job moved on without this runner (its lease lapsed and another runner took over)."""


def request_id(job: JobRecord, custom_id: str | None = None, *, hashed: str | None = None) -> str:
    """The request id of a line, from its custom_id (or that id's digest, as the job's id hash keeps it)."""
    return bulk_request_id(job.id, job.epoch, hashed or digest(custom_id or ""))


def error_entry(error: LineError, status: str = "invalid") -> dict[str, Any]:
    return {
        "v": SCHEMA_VERSION, "id": f"line-{error.number}", "status": status, "error": error.message,
        "tag": formats.make_tag(error.number, error.kind, "text", "", error.custom_id),
    }  # fmt: skip


class BulkRunner:
    def __init__(
        self,
        client: InferenceClient,
        store: BulkStore,
        job: JobRecord,
        source: LineSource,
        *,
        name: str,
        on_progress: Callable[[JobRecord], None] = lambda job: None,
    ) -> None:
        self.client = client
        self.store = store
        self.job = job
        self.source = source
        self.name = name
        self.on_progress = on_progress
        self.window = client.settings.bulk_window
        self._counted = asyncio.Event()  # set whenever records were counted: room in the window
        self._stop_feeding = False
        self._cancelling = False

    async def run(self, until: float | None = None, *, wait_s: float = 0.0) -> JobRecord:
        """Move the job on until every fed line is accounted for (returns with state FINALIZING, or CANCELLING
        if it was cancelled) or until the monotonic time `until` (returns with the job still running).
        Waits up to `wait_s` for the job's lease (a killed run's lease lapses within LEASE_S); raises JobBusy if
        another process holds it still, LeaseLost if the job was taken over meanwhile."""
        lock = Lock(self.client.redis, self.store.keys.bulk_lease(self.job.id), timeout=LEASE_S, thread_local=False)
        token = f"{self.name}:{random.getrandbits(32):08x}"
        if not await lock.acquire(blocking=wait_s > 0, blocking_timeout=wait_s, token=token):
            holder = text(await self.client.redis.get(self.store.keys.bulk_lease(self.job.id)) or b"?")
            raise JobBusy(f"bulk job {self.job.id} is being run by {holder}; wait for it, or stop it first")
        try:
            fresh = await self.store.get(self.job.id)  # the lease is ours: now read where the job stands
            if fresh is None:
                raise InferqError(f"bulk job {self.job.id} no longer exists")
            self.job = fresh
            self._cancelling = fresh.state == CANCELLING
            await self.store.change_state(self.job.id, IN_PROGRESS, {VALIDATING})
            if not self.job.started_at:
                self.job.started_at = time.time()
                await self.store.update(self.job.id, started_at=repr(self.job.started_at), runner=self.name)
            else:
                await self.store.update(self.job.id, runner=self.name)
            await self._run_leased(lock, until)
            return self.job
        finally:
            try:
                await lock.release()
            except LockError:
                pass  # lapsed: nothing of ours to release

    async def _run_leased(self, lock: Lock, until: float | None) -> None:
        feeder = asyncio.create_task(self._feed(until), name=f"inferq-bulk-feed-{self.job.id}")
        renew = asyncio.create_task(self._renew(lock), name=f"inferq-bulk-lease-{self.job.id}")
        tally = asyncio.create_task(self._tally(until), name=f"inferq-bulk-tally-{self.job.id}")
        tasks = {feeder, renew, tally}
        try:
            while tally in tasks:  # the tally ends the run; a failed feeder or a lost lease ends it too
                finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    task.result()  # re-raise
                    tasks.discard(task)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.job.all_accounted:
            await self.store.change_state(self.job.id, FINALIZING, {IN_PROGRESS})
            self.job.state = FINALIZING if not self._cancelling else CANCELLING

    async def _renew(self, lock: Lock) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 4)
            try:
                await lock.reacquire()
            except LockError as exc:
                raise LeaseLost(f"bulk job {self.job.id}: lease lost ({exc}); another runner has it") from None

    # ---- feeding -----------------------------------------------------------------------------------------
    async def _feed(self, until: float | None) -> None:
        if not self.job.feed_done:
            async for batch in self.source.batches(self.job.fed, min(BATCH, self.window)):
                while self.job.fed - self.job.accounted + len(batch) > self.window and not self._stop_feeding:
                    self._counted.clear()
                    await self._counted.wait()
                if self._stop_feeding:
                    break
                if until is not None and time.monotonic() > until:
                    return
                if not await self._feed_batch(batch, until):
                    return
            await self._commit([], 0, 0, feed_done=True)
        if self._stop_feeding:
            await self._cancel_outstanding()  # after the last batch: nothing admitted later escapes the sweep

    async def _feed_batch(self, batch: list[Numbered], until: float | None) -> bool:
        """Feed and commit one batch; False if the run's time ran out first (nothing committed)."""
        parsed = [self._parse(number, raw) for number, raw in batch]
        firsts = await self.store.first_lines(self.job.id, [(p.custom_id, p.number) for p, _ in parsed])
        errors: list[dict[str, Any]] = []
        todo: list[tuple[GenerationRequest, bytes]] = []  # each request with its payload, packed once
        for (line, built), first in zip(parsed, firsts, strict=True):
            if first != line.number:
                errors.append(error_entry(duplicate(line.number, line.custom_id, line.kind, first)))
            elif isinstance(line, LineError) or built is None:
                errors.append(error_entry(line))  # type: ignore[arg-type]
            else:
                todo.append(built)
        admitted = len(todo)
        while todo:  # a full queue is waited out, never an error
            outcomes = await self.client.enqueue_many([r for r, _ in todo], packed=[p for _, p in todo])
            todo = [built for built, a in zip(todo, outcomes, strict=True) if a.code not in (ADMITTED, EXISTS)]
            if todo and self._stop_feeding:  # cancelled meanwhile: what is not queued will not be
                for r, _ in todo:
                    number, kind, _, _, custom_id = formats.read_tag(r.tag or "[]", self.job.tag_defaults)
                    message = f"line {number}: the job was cancelled before this line was queued"
                    errors.append(error_entry(LineError(number, custom_id, kind, message), status="cancelled"))
                admitted -= len(todo)
                break
            if todo:
                if until is not None and time.monotonic() > until:
                    return False  # not committed: the next run replays this batch, adding nothing twice
                await asyncio.sleep(random.uniform(0.2, 1.0))
        await self._commit(errors, len(batch), admitted)
        return True

    def _parse(self, number: int, raw: str) -> tuple[BulkLine | LineError, tuple[GenerationRequest, bytes] | None]:
        line = parse_line(number, raw, self.job.model, self.job.format or SIMPLE)
        if isinstance(line, LineError):
            return line, None
        model = line.params.get("model", self.job.model)
        try:
            tag = formats.make_tag(number, line.kind, line.endpoint, model, line.custom_id, self.job.tag_defaults)
            # No reply_stream: the worker takes the job's from the line's id (keys.job_reply_stream), ~50 bytes
            # less of every queued line.
            built = self.client.build_packed(request_id=request_id(self.job, line.custom_id), tag=tag, **line.params)
        except InvalidRequest as exc:
            return refused(line, exc), None
        return line, built

    async def _commit(self, errors: list[dict[str, Any]], lines: int, requests: int, feed_done: bool = False) -> None:
        if not await self.store.commit_feed(self.job.id, self.job.fed, lines, requests, feed_done, errors):
            raise LeaseLost(f"bulk job {self.job.id} was fed by another runner meanwhile")
        self.job.fed += lines
        self.job.submitted += requests
        self.job.feed_done = int(feed_done or self.job.feed_done)

    # ---- counting ----------------------------------------------------------------------------------------
    async def _tally(self, until: float | None) -> None:
        while not self.job.all_accounted:
            if until is not None and time.monotonic() > until:
                return
            records = await self.store.records(self.job.id, self.job.tallied_to, block_ms=500)
            if records:
                counts = {"done": 0, "failed": 0, "invalid": 0, "tokens": 0}
                for _, record in records:
                    status = record.get("status")
                    counts["done" if status == "done" else "invalid" if status == "invalid" else "failed"] += 1
                    counts["tokens"] += int(record.get("completion_tokens", 0))
                last = records[-1][0]
                if not await self.store.commit_tally(self.job.id, self.job.tallied_to, last, counts):
                    raise LeaseLost(f"bulk job {self.job.id} was counted by another runner meanwhile")
                self.job.tallied_to = last
                for name, n in counts.items():
                    setattr(self.job, name, getattr(self.job, name) + n)
                self._counted.set()
                self.on_progress(self.job)
            await self._check_cancel()

    async def _check_cancel(self) -> None:
        """A cancel (`inferq bulk cancel`) stops the feeder at its next batch; it then cancels what is
        outstanding. If the input was fed already, that happens here."""
        if self._stop_feeding:
            return
        if not self._cancelling:
            state = await self.client.redis.hget(self.store.keys.bulk(self.job.id), "state")
            self._cancelling = state == CANCELLING.encode()
        if self._cancelling:
            self._stop_feeding = True
            self._counted.set()  # wake a feeder waiting for room: it stops
            if self.job.feed_done:
                await self._cancel_outstanding()

    async def _cancel_outstanding(self) -> None:
        """Cancel every request of the job that has not ended (queued ones end at once, running ones are
        aborted); each still sends its record, so the count completes. Unfed lines never run."""
        ids: list[str] = []
        async for d in self.store.digests(self.job.id):
            ids.append(request_id(self.job, hashed=d))
            if len(ids) >= 1000:
                await self.client.cancel_many(ids)
                ids = []
        if ids:
            await self.client.cancel_many(ids)

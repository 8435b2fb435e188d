"""The consumer-group worker: read as many entries as there are free slots (read_batch at a time), run them on
the engine, stream their tokens, and end each with one atomic step (result + ack + delete) (docs/CONTRACTS.md,
"Delivery").

Every entry ends in exactly one stored final state: `done`, `failed` (and dead-lettered), `cancelled` or
`expired`; or it stays pending, owned by this worker, until another worker takes it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from inferq.shared.aio import cancel_and_wait
from inferq.shared.batching import WITHDRAWN, BatchedScript
from inferq.shared.codec import text, unpack
from inferq.shared.connection import OUTAGE, Backoff, retry_outages, wait_for_redis
from inferq.shared.errors import BadPayload, EngineError, InvalidRequest, WriteRefused
from inferq.shared.keys import GROUP, Keys
from inferq.shared.lifecycle import AsyncLifecycle
from inferq.shared.limits import check_request, wait_limit, without_foreign_targets
from inferq.shared.schemas import GenerationRequest, salvage
from inferq.shared.settings import Settings
from inferq.shared.subscription import Subscription
from inferq.worker import scripts
from inferq.worker.claims import Claims, Entry
from inferq.worker.engine import Delta, Engine, RequestRejected
from inferq.worker.flow import SlotControl
from inferq.worker.jobs import Job
from inferq.worker.lanes import LaneShares
from inferq.worker.metrics import WorkerMetrics, queued_at
from inferq.worker.outbox import Outbox
from inferq.worker.reading import LaneReader
from inferq.worker.requests import FORGED, RequestWriter
from inferq.worker.upkeep import Upkeep

log = logging.getLogger("inferq.worker")


# The stop reason of a request whose token events Redis refused (no permission on its channel): it ends `failed`
# and is dead-lettered without its reply targets, as one whose final writes Redis refused.
_REFUSED = "refused"
_FOREIGN = "foreign"  # start.lua's answer for a forged entry (one naming a request admitted with another entry)


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker(Upkeep, AsyncLifecycle):
    """`async with Worker(...) as w: await w.run()`; `stop_reading()` then `drain()` for a clean stop."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        redis: Redis,
        *,
        model: str,
        consumer: str | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.model = model
        self.name = consumer or default_consumer_name()
        self.keys = Keys.of(settings)
        self.shards = self.keys.all_queues(model)  # each shard's lane streams, highest priority first
        self.streams = [stream for lanes in self.shards for stream in lanes]
        self._shard_of_stream = {stream: shard for shard, lanes in enumerate(self.shards) for stream in lanes}
        self.capacity = settings.max_inflight
        self.flow = SlotControl(self.capacity)
        self.outbox = Outbox(redis)
        self.metrics = metrics or WorkerMetrics(self.keys, model)
        self.metrics.running.labels(model).set_function(lambda: len(self._jobs))
        self.metrics.slots.labels(model).set_function(lambda: self.flow.slots)
        self.writer = RequestWriter(self.outbox, self.keys, settings, self.name, model, self.metrics)
        self.claims = Claims(redis, settings, self.shards, self.name)
        self.reader = LaneReader(redis, self.shards, self.name, LaneShares(settings.lane_min_share))
        self._start_script = BatchedScript(redis, scripts.START)
        self._cancels = Subscription(redis, self.keys.cancel(), self._on_cancel)
        # (lane stream, entry id) -> job: ids are unique per stream only (two lanes can hand out the same id)
        self._jobs: dict[tuple[str, str], Job] = {}
        self._by_request: dict[str, Job] = {}  # request id -> job, for cancel and deadline
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._maintenance: asyncio.Task[None] | None = None
        # Set by start(). Per request, tasks come from it directly: on Python 3.11 each asyncio.get_running_loop()
        # (asyncio.create_task and ensure_future call it) is a getpid() system call.
        self._loop: asyncio.AbstractEventLoop
        self._checks: set[asyncio.Task[None]] = set()  # cancel broadcasts being checked against their mark
        self.fatal: BaseException | None = None
        self.tokens_out = 0
        self.completed = 0
        self._progress_at = time.monotonic()  # the engine's last output (watched by _engine_stalled)
        # A suspect (an entry that went down with workers more than once) runs alone: while it runs, or while
        # one waits for this worker to be idle to take it, nothing new is read.
        self._suspect: tuple[str, str] | None = None
        self._suspect_waiting = False

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await wait_for_redis(self.redis, f"worker {self.name}", log)
        for stream in self.streams:
            try:  # from 0: entries added before the first worker started are read too
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        for script in scripts.OUTBOX_SCRIPTS:
            await script.load(self.redis)
        self.outbox.start()
        self._start_script.start()
        await self._cancels.start()  # before reading: a cancel sent after we start a request is heard
        await self._beat()  # the heartbeat key doubles as "ready": the engine is up, reading starts now
        self._maintenance = asyncio.create_task(self._maintain(), name="inferq-maintenance")
        log.info(
            "worker %s ready: model %s, %d slots, engine %s", self.name, self.model, self.capacity, self.engine.name
        )

    async def close(self) -> None:
        await cancel_and_wait(self._maintenance)
        await self.reader.close()
        for check in list(self._checks):
            await cancel_and_wait(check)
        await self._cancels.stop()
        await self._start_script.stop()
        # Bounded: with Redis gone, unwritten results are dropped, but their entries stay pending (unacked)
        # and another worker runs them again.
        await self.outbox.stop(timeout_s=max(self.settings.drain_timeout_s, 1.0))
        with contextlib.suppress(Exception):
            await self.redis.delete(self.keys.worker(self.name))
            await self.redis.zrem(self.keys.workers_index(), self.name)

    def stop_reading(self) -> None:
        self._stopping.set()
        self._slot_free.set()

    async def drain(self, timeout_s: float) -> None:
        """Wait for in-flight requests up to `timeout_s`; abort the rest and leave them pending for others."""
        tasks = {job.task for job in self._jobs.values() if job.task is not None}
        if tasks:
            log.info("draining %d in-flight requests (up to %.0fs)", len(tasks), timeout_s)
            _, late = await asyncio.wait(tasks, timeout=timeout_s)
            if late:
                log.warning("drain timeout: leaving %d requests pending for other workers", len(late))
            await self.abandon()

    async def abandon(self) -> None:
        """Abort everything in flight without acknowledging it: other workers will take it over."""
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def interrupt(self, request_id: str, reason: str, error: str | None = None) -> None:
        """Abort a running request on purpose (reason "cancelled", "expired", or "failed" with `error`); it
        ends with that status. Reason "refused" (its token events, with Redis's refusal as `error`): it ends
        `failed` and goes to the DLQ without its reply targets."""
        job = self._by_request.get(request_id)
        if job is None or job.task is None or not job.interruptible or job.stop_reason is not None:
            return
        job.stop_reason, job.error = reason, error
        job.task.cancel()  # AsyncLLM aborts the request when its generator is cancelled

    # ---- reading ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Read and dispatch until stop_reading() (or a dead engine). Survives Redis outages."""
        backoff = Backoff()
        while not self._stopping.is_set():
            free = self.flow.slots - len(self._jobs)
            if free <= 0 or self._suspect is not None or (self._suspect_waiting and self._jobs):
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                # A read takes at most read_batch: the first entries start while the next read runs. One read of
                # every free slot moves them all through start and finish together, with Redis idle while the
                # worker works and the other way round (a third less throughput on a zero-cost engine).
                entries = await self._read(min(free, self.settings.read_batch))
            except OUTAGE as exc:
                delay = backoff.next()
                log.warning("redis unreachable (%s); reading again in %.2fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                continue
            backoff.reset()
            for entry in entries:
                self._dispatch(*entry)
        # A blocking read still out on another shard may yet take entries: they are this worker's, run them.
        for entry in await self.reader.collect_waits(wait=True):
            self._dispatch(*entry)

    async def _read(self, free: int) -> list[Entry]:
        if self.claims.takeover_due() or self._suspect_waiting:
            taken, suspect, self._suspect_waiting = await self.claims.take_over(free, idle=not self._jobs)
            if suspect:
                self._suspect = (taken[0][0], taken[0][1])
                log.warning(
                    "took over entry %s alone: it went down with workers %d times (a request that kills the "
                    "engine?); reading nothing else until it ends", taken[0][1], taken[0][3] - 1,
                )  # fmt: skip
            elif taken:
                log.info("took over %d entries idle for more than %d ms", len(taken), self.claims.idle_ms)
            if taken or self._suspect_waiting:
                return taken
        return await self.reader.read(free)

    def _dispatch(self, stream: str, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        if (stream, entry_id) in self._jobs:  # taken over from ourselves after a lost renewal: it runs already
            return
        job = Job(stream, entry_id, fields, deliveries)
        if deliveries > 1:  # an entry is delivered again only when a worker takes it over (claim.lua)
            series = self.metrics.of(stream)
            series.redelivered.inc()
            series.taken_over.inc()
        job.task = self._loop.create_task(self._process(job), name=f"inferq-{entry_id}")
        self._jobs[(stream, entry_id)] = job
        job.task.add_done_callback(lambda _t: self._release(job))

    def _release(self, job: Job) -> None:
        self._jobs.pop((job.stream, job.entry_id), None)
        if self._suspect == (job.stream, job.entry_id):
            self._suspect = None
        if job.request is not None and self._by_request.get(job.request.id) is job:
            del self._by_request[job.request.id]
        self._slot_free.set()

    # ---- one request -----------------------------------------------------------------------------
    async def _process(self, job: Job) -> None:
        try:
            await self._process_entry(job)
        except WriteRefused as exc:
            # Redis refused a write for this request (a reply channel it may not publish to, a reply stream
            # that is not a stream): end it `failed` without its reply targets. The other requests go on.
            if job.request is None:
                raise
            reason = f"Redis refused a write to the request's reply target: {exc}"
            log.warning("request %s: %s", job.request.id, reason)
            bare = job.request.model_copy(update={"reply_channel": None, "reply_stream": None})
            await self._failed(job, bare, reason)

    async def _process_entry(self, job: Job) -> None:
        fields, deliveries = job.fields, job.deliveries
        raw = fields.get(b"m")
        data: object = None
        try:
            if raw is None:
                raise BadPayload("queue entry has no 'm' field")
            data = unpack(raw)
            if isinstance(data, dict) and "reply_stream" not in data and isinstance(data.get("id"), str):
                # A bulk line's entry leaves its job's reply stream out: its id names the job (keys.py). Filled in
                # before validation, so a poison line's salvage still tells its job.
                if (job_stream := self.keys.job_reply_stream(data["id"])) is not None:
                    data["reply_stream"] = job_stream
            request = GenerationRequest.from_payload(data)
        except BadPayload as exc:
            log.warning("entry %s on %s is poison: %s", job.entry_id, job.stream, exc)
            job.request = salvage(data, self.model, self.keys)
            await self.writer.dead_letter(job.stream, job.entry_id, fields, str(exc), deliveries, job.request)
            return
        try:  # what the producer checked, checked again: an entry may come from anyone who can reach Redis
            check_request(request, len(raw), self.settings, self.keys)
        except InvalidRequest as exc:
            log.warning("entry %s on %s refused: %s", job.entry_id, job.stream, exc)
            job.request = without_foreign_targets(request, self.keys)  # nothing is written to a target not ours
            await self.writer.dead_letter(job.stream, job.entry_id, fields, f"refused: {exc}", deliveries, job.request)
            return
        shard = self.keys.shard_of(request.id)
        if shard != self._shard_of_stream.get(job.stream):  # known per stream: no parsing of its name per request
            # Its result lives in another shard (another slot of a cluster): nothing of it is ours to write.
            reason = f"refused: request {request.id} belongs to shard {shard}, not this one"
            log.warning("entry %s on %s %s", job.entry_id, job.stream, reason)
            await self.writer.dead_letter(job.stream, job.entry_id, fields, reason, deliveries, None)
            return
        job.request = request
        self._by_request.setdefault(request.id, job)  # a forged entry with a running request's id takes nothing
        if deliveries > self.settings.max_deliveries:
            reason = (
                f"delivered {deliveries} times without finishing (max_deliveries={self.settings.max_deliveries}): "
                "each worker that took it died or stalled"
            )
            log.warning("request %s: %s", request.id, reason)
            await self.writer.dead_letter(job.stream, job.entry_id, fields, reason, deliveries, request)
            return
        try:
            await self._run(job, request)
        except asyncio.CancelledError:
            if job.stop_reason is None:
                if job.start is not None:  # not sent yet: it must not land after another worker took the entry
                    self.outbox.withdraw(job.start)
                raise  # shutdown or a lost claim: leave the entry pending, write nothing
            task = asyncio.current_task()
            if task is not None and task.uncancel() > 0:
                raise  # a shutdown cancel came on top of the interrupt: it wins
            if job.stop_reason == _REFUSED:  # ends as a request whose final writes Redis refused (_process)
                raise WriteRefused(job.error or "") from None
            if job.stop_reason == _FOREIGN:  # its start, not awaited, found it forged
                await self._forged(job, request)
                return
            log.info("request %s %s after %d tokens", request.id, job.stop_reason, job.gen.completion_tokens)
            await self._end(job, request, job.stop_reason, job.error)
        except EngineError as exc:
            # Leave this entry (and every other in-flight one) pending: the engine, not the request, failed.
            if self.fatal is None:
                self.fatal = exc
                log.error("ENGINE FAILED: worker %s stops and leaves its work pending for others: %s", self.name, exc)
                self.stop_reading()
        except RequestRejected as exc:
            job.interruptible = False  # its final write now: never interrupted
            await self._failed(job, request, f"rejected by the engine: {exc}")
        except Exception as exc:
            job.interruptible = False
            log.exception("request %s failed in the engine", request.id)
            await self._failed(job, request, f"engine error: {exc.__class__.__name__}: {exc}")

    async def _run(self, job: Job, request: GenerationRequest) -> None:
        """Start the request (unless it ended, was cancelled or is past its deadline) and generate it.
        An interrupt (cancel, deadline) raises CancelledError here; _process ends the request then."""
        added = queued_at(job.entry_id)
        if time.time() >= wait_limit(request, added, self.settings):
            await self.writer.end(job.stream, job.entry_id, request, "expired", job.gen)
            return
        job.interruptible = True
        # The engine takes the prompt (tokenizing, scheduling its prefill) while start.lua's round trip runs: the
        # first token's wait no longer includes it. Nothing is written for the request until start.lua has
        # said "running"; any other answer aborts the engine's work. Not when this worker runs another entry
        # with the same request id (a forged one): the engine knows a request by its id.
        deltas = self.engine.generate(request)
        owner = self._by_request.get(request.id) is job
        # Started with its first write: a request that sends no token events has nothing written before its final
        # write, so its start need not be awaited. start.lua goes out with the outbox's next batch, and its
        # answer, if not "running", stops the run (_started_later); a run that ends before that batch went out
        # takes its start back and its final write makes it (finish.lua): a short request costs one script call.
        # Only on a first delivery: no run started it before, so this one is its first attempt. (Nothing is
        # awaited before its engine run, so that run needs no task of its own to begin in the meantime.)
        later = owner and job.deliveries == 1 and not request.publishes
        first = asyncio.ensure_future(anext(deltas), loop=self._loop) if owner and not later else None
        if later:
            keys, args, run = self._start_call(request, job, added)
            job.gen.run = {**run, "attempts": "1"}
            job.start = self.outbox.add_withdrawable(scripts.START.command(keys, args))
            job.start[0].add_done_callback(functools.partial(self._started_later, job))
        else:
            try:
                status = await self._mark_running(request, job, added)
            except BaseException:
                await _discard(first, deltas)
                raise
            if status != "running":
                await _discard(first, deltas)
                job.interruptible = False
                await self._not_started(job, request, status)
                return
            if not owner and (forged := self._by_request.get(request.id)) is not None and forged.task is not None:
                # This entry is the request's own, so the one read first with its id is forged. It may still run
                # in the engine (its start not awaited), and the engine knows a request by its id: run this one
                # once that one has ended (its start's answer stops it).
                await asyncio.wait({forged.task})
                self._by_request.setdefault(request.id, job)  # cancels and deadlines reach this run now
        job.gen.started_at = time.time()
        self.metrics.started(job.stream, job.entry_id)
        loop = self._loop
        limit = self.settings.max_run_s
        why = f"ran longer than {limit:g} s (INFERQ_MAX_RUN_S): stopped by the worker's watchdog"
        timers = [loop.call_later(limit, self.interrupt, request.id, "failed", why)]
        if request.deadline is not None:
            delay = max(request.deadline - time.time(), 0.0)
            timers.append(loop.call_later(delay, self.interrupt, request.id, "expired"))
        try:
            await self._generate(job, request, _resumed(first, deltas))
        finally:
            for timer in timers:
                timer.cancel()

    async def _not_started(self, job: Job, request: GenerationRequest, status: str) -> None:
        """start.lua did not say "running": a forged entry is dead-lettered; a request that ended already (cancelled
        while queued) is only acknowledged (finish.lua keeps its state); one "cancelled" but not ended yet (the
        cancel came between the read and the start) ends cancelled."""
        if status == _FOREIGN:
            await self._forged(job, request)
        else:
            await self._end(job, request, status)

    async def _forged(self, job: Job, request: GenerationRequest) -> None:
        reason = f"forged entry: request {request.id} was admitted with another queue entry; it was left as it is"
        log.warning("entry %s on %s: %s", job.entry_id, job.stream, reason)
        await self.writer.dead_letter(job.stream, job.entry_id, job.fields, reason, job.deliveries, None)

    async def _end(self, job: Job, request: GenerationRequest, status: str, error: str | None = None) -> None:
        """The final write of a run (with its start, if that has not gone out); a forged entry, found only now
        (its start was not awaited), is dead-lettered."""
        code = await self.writer.end(job.stream, job.entry_id, request, status, job.gen, error=error, start=job.start)
        if code == FORGED:
            await self._forged(job, request)

    async def _failed(self, job: Job, request: GenerationRequest, error: str) -> None:
        """The run ends `failed` and dead-lettered (the engine refused or failed it, or Redis refused a write to its
        reply targets: then `request` is without them), with its start if that has not gone out."""
        run = job.gen.run if job.start is not None else None
        await self.writer.dead_letter(job.stream, job.entry_id, job.fields, error, job.deliveries, request,
                                      start=job.start, run=run)  # fmt: skip

    def _started_later(self, job: Job, sent: asyncio.Future[Any]) -> None:
        """The answer to a start not awaited: anything but "running" stops the run (see _not_started)."""
        if sent.cancelled() or job.request is None or self._by_request.get(job.request.id) is not job:
            return  # the worker stops; or this run ended (a later job with its id is not this answer's)
        reply = sent.exception() or sent.result()
        if reply is WITHDRAWN or isinstance(reply, list):
            return  # running; or taken back, and made by the final write
        if isinstance(reply, BaseException):
            self.interrupt(job.request.id, "failed", f"Redis refused its start: {reply}")
        else:
            self.interrupt(job.request.id, text(reply))

    def _start_call(
        self, request: GenerationRequest, job: Job, queued_at: float
    ) -> tuple[list[str], list[Any], dict[str, str]]:
        """start.lua's keys and args for this run, and what it stores (the run's fields)."""
        entry = f"{job.entry_id} {job.stream}"  # what the admission stored as the request's own entry
        started_at, added = repr(time.time()), repr(queued_at)
        args = [self.name, started_at, self.settings.result_ttl_s, request.model, added, entry]
        keys = [self.keys.result(request.id)]
        line = self.keys.bulk_line(request.id)
        if line is not None:  # a bulk job's line: its entry may be in the job's id hash (start.lua)
            keys.append(line[0])
            args.append(line[1])
        return keys, args, {"model": request.model, "started_at": started_at, "worker": self.name, "queued_at": added}

    async def _mark_running(self, request: GenerationRequest, job: Job, queued_at: float) -> str:
        """Run start.lua (batched with the other requests read at the same time); retried while Redis is down."""
        keys, args, run = self._start_call(request, job, queued_at)
        reply = await retry_outages(lambda: self._start_script(keys, args), f"starting {request.id}", log)
        if isinstance(reply, list):  # ['running', attempts]: what this run stored, for its final event
            job.gen.run = {**run, "attempts": str(reply[1])}
            return "running"
        return text(reply)

    async def _generate(self, job: Job, request: GenerationRequest, deltas: AsyncIterator[Delta]) -> None:
        gen = job.gen
        channel = request.reply_channel if request.publishes else None
        async for delta in deltas:
            self._progress_at = time.monotonic()
            if gen.add(delta):
                break
            if channel:
                sent = self.outbox.publish(channel, gen.event(request.id, delta))
                sent.add_done_callback(functools.partial(self._published, request.id))
        job.interruptible = False
        self.tokens_out += gen.completion_tokens
        await self._end(job, request, "done")
        self.completed += 1

    def _published(self, request_id: str, sent: asyncio.Future[None]) -> None:
        """A token event Redis refused (no permission on the channel): stop generating what nobody gets."""
        error = None if sent.cancelled() else sent.exception()
        if error is not None:
            self.interrupt(request_id, _REFUSED, str(error))


async def _resumed(first: asyncio.Future[Delta] | None, rest: AsyncGenerator[Delta, None]) -> AsyncIterator[Delta]:
    """The engine's deltas, `first` (already asked for) ahead of the rest; closing this closes the engine's."""
    try:
        if first is not None:
            try:
                yield await first
            except StopAsyncIteration:
                return
        async for delta in rest:
            yield delta
    finally:
        await _discard(first, rest)


async def _discard(first: asyncio.Future[Delta] | None, rest: AsyncGenerator[Delta, None]) -> None:
    """Stop an engine run that must not go on (AsyncLLM aborts a request whose generator is closed)."""
    if first is not None and not first.done():
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
    elif first is not None and not first.cancelled():
        first.exception()  # done (as for every request that ran): its error, if any, is seen; nothing to wait for
    await rest.aclose()

"""Every Redis write of one engine step goes out in one transaction: never one round trip per token. (On a
cluster, which has none: one pipeline of the writes, then one of the events.)

Request tasks add commands and token events without waiting; the batcher (shared.batching) wakes once per
event loop turn, gathers everything the step produced and sends it as one MULTI/EXEC pipeline, with the
events for each reply channel packed into a single PUBLISH, ahead of the writes: a request's final event is
sent by its final write (finish.lua), after its last token event. (On a cluster it goes with the events,
after the writes.) Callers that must know their write landed (the final result + ack) await the future
`add` returns. Batches are sent one at a time, in order.

A Redis outage, or a refusal that passes (OOM, READONLY during a failover), is retried until the writes
land: a final result is never lost. A write Redis refuses for what it asks (no permission on a reply
channel, a reply stream that is not a stream) is tried alone a few times, then its caller gets WriteRefused
and ends that one request `failed`; the rest of the batch is written and the worker goes on. (On a cluster a
refused PUBLISH comes in its own reply, not as a refused transaction.)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections import defaultdict
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, NoScriptError, ResponseError

from inferq.shared.batching import Batcher, Ticket
from inferq.shared.connection import OUTAGE, Backoff, execute_all, is_cluster, passing_refusal, pipeline, retry_outages
from inferq.shared.errors import WriteRefused
from inferq.shared.lua import Command, Merged, reload_missing
from inferq.shared.schemas import pack_events

log = logging.getLogger("inferq.worker")

Event = tuple[str, dict[str, Any]]  # (reply channel, token event)
Item = tuple[tuple[Command, ...], tuple[Event, ...]]  # what one caller adds: its commands, then its events

# How often one request's writes are tried alone before the request ends without them (WriteRefused).
_TRIES = 3
_MAX_REASON = 300


class Outbox(Batcher[Item]):
    def __init__(self, redis: Redis) -> None:
        super().__init__("outbox")
        self.redis = redis
        self.batches = 0  # how many transactions were sent (for stats and tests)

    async def stop(self, timeout_s: float | None = None) -> None:  # type: ignore[override]
        """Send what is queued (waiting at most `timeout_s` for Redis), then stop."""
        if not self.running:
            return
        try:
            await asyncio.wait_for(self.flush(), timeout_s)
        except TimeoutError:
            log.error("could not write %d queued writes before stopping (redis down?)", self.pending)
        await super().stop()

    def publish(self, channel: str, event: dict[str, Any]) -> asyncio.Future[None]:
        """Queue a token event; its future fails with WriteRefused if Redis will not take it."""
        return self.submit(((), ((channel, event),)))

    def add(self, *commands: Command, events: tuple[Event, ...] = ()) -> asyncio.Future[Any]:
        """Queue commands (and, on a cluster, events to send once they are written: a request's final event);
        the future resolves once they are written, with the first one's reply."""
        return self.submit((commands, events))

    def add_withdrawable(self, command: Command) -> Ticket:
        """Queue a command that its caller may take back (`withdraw`) until its batch goes out: a request's start,
        which its final write makes instead if it has not gone out by then (worker/consumer.py)."""
        return self.submit_withdrawable(((command,), ()))

    async def flush(self) -> None:
        """Until everything queued before this call is written."""
        await self.add()

    async def send(self, items: list[Item]) -> list[Any]:
        """Per item: the reply to its first command (None for token events alone), or WriteRefused."""
        replies: list[Any] = [None] * len(items)
        try:
            errors = await self._write(items, replies)
        except _Aborted as exc:
            # The server refused the whole transaction (a command it would not queue): nothing was written.
            # Each item goes alone, so the one Redis refuses fails by itself and the others land.
            errors = [exc.reason] * len(items)
        refused_channels: dict[str, BaseException] = {}  # token events alone: one try per channel and batch
        for i, error in enumerate(errors):
            if error is None:
                continue
            commands, events = items[i]
            channels = {channel for channel, _ in events}
            if not commands and channels <= refused_channels.keys():
                errors[i] = refused_channels[next(iter(channels))]
                continue
            errors[i] = error = await self._write_alone(items, i, _TRIES if commands else 1, replies)
            if error is not None:
                what = "a request's final writes" if commands else f"token events to {', '.join(sorted(channels))}"
                log.error("redis refused %s; the request ends without them: %s", what, _short(error))
                if not commands:
                    refused_channels.update(dict.fromkeys(channels, error))
        return [reply if e is None else WriteRefused(_short(e)) for e, reply in zip(errors, replies, strict=True)]

    async def _write_alone(self, items: list[Item], at: int, tries: int, replies: list[Any]) -> BaseException | None:
        """Item `at`'s writes in a transaction of their own, tried up to `tries` times: None once written (its
        first command's reply in `replies[at]`), or the refusal that stood every time."""
        backoff, error, reply = Backoff(), None, [None]
        for attempt in range(tries):
            if attempt:
                await asyncio.sleep(backoff.next())
            try:
                (error,) = await self._write([items[at]], reply)
            except _Aborted as exc:
                error = exc.reason
            if error is None:
                replies[at] = reply[0]
                return None
        return error

    async def _write(self, items: list[Item], replies: list[Any]) -> list[BaseException | None]:
        """Write `items` in one transaction: per item, None or the error Redis answered one of its commands
        with (the rest of the transaction is written), and the reply to its first command in `replies`. Raises
        _Aborted if the server refused the transaction."""
        commands = [(i, n, command) for i, (batch, _) in enumerate(items) for n, command in enumerate(batch)]
        events: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        for _, batch_events in items:
            for channel, event in batch_events:
                events[channel].append(event)
        errors: list[BaseException | None] = [None] * len(items)
        while commands or events:
            raw = [command for _, _, command in commands]
            # The finishes of the batch: one script call (per slot, on a cluster: shared.lua).
            merged = Merged(raw, by_slot=is_cluster(self.redis))
            sent, refused_channels = await self._send(merged.commands, events)
            results = merged.split(sent)
            for (owner, n, _), result in zip(commands, results, strict=False):
                if isinstance(result, Exception) and not isinstance(result, NoScriptError):
                    errors[owner] = result
                elif n == 0:
                    replies[owner] = result
            if refused_channels:  # a cluster's PUBLISH replies (see _send)
                _refused_events(items, refused_channels, errors)
            # A script the server did not know (it restarted) ran nothing: load it and send those calls again.
            reload = functools.partial(reload_missing, self.redis, raw, results)
            refused = await retry_outages(reload, "loading a script again", log)
            commands, events = [commands[i] for i in refused], defaultdict(list)
        return errors

    async def _send(
        self, commands: list[Command], events: dict[str, list[dict[str, Any]]]
    ) -> tuple[list[Any], dict[str, BaseException]]:
        """The commands' replies, and the channels whose PUBLISH Redis refused. That comes in a PUBLISH's reply
        only on a cluster, where it is no part of a transaction; one server refuses the whole transaction
        (_Aborted)."""
        backoff = Backoff()
        publish = [("PUBLISH", channel, pack_events(batch)) for channel, batch in events.items()]
        while True:
            try:
                if is_cluster(self.redis):
                    # No MULTI on a cluster, and its pipeline sends to every node at once: the events go once the
                    # writes before them have landed, so no final event arrives before its stored result. (A
                    # final event sent by finish.lua, from the node of its result, could overtake token events
                    # sent through another node: on a cluster the final events go here, after the writes.)
                    results = await self._pipelined(commands, atomic=False)
                    published = await self._pipelined(publish, atomic=False)
                else:
                    # Token events first: a request's final event goes from finish.lua, after its token events.
                    replies = await self._pipelined([*publish, *commands], atomic=True)
                    published, results = replies[: len(publish)], replies[len(publish) :]
                self.batches += 1
                refused = {
                    command[1]: reply
                    for command, reply in zip(publish, published, strict=True)
                    if isinstance(reply, Exception)
                }
                return results, refused
            except OUTAGE as exc:
                # Final results must not be lost: retry until Redis is back. A repeated token event shows up
                # as a seq gap at the client, which then reads the stored result.
                delay = backoff.next()
                log.warning("redis write failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
            except ResponseError as exc:
                if not passing_refusal(exc):
                    raise _Aborted(exc) from exc
                # Refused until memory frees or a failover ends (OOM, READONLY): nothing was written; retry.
                delay = backoff.next()
                log.error("redis refused the writes (%s); retrying in %.2fs", _short(exc), delay)
                await asyncio.sleep(delay)

    async def _pipelined(self, commands: list[Command], *, atomic: bool) -> list[Any]:
        if not commands:
            return []
        async with pipeline(self.redis, atomic=atomic) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await execute_all(self.redis, pipe)


def _refused_events(items: list[Item], refused: dict[str, BaseException], errors: list[BaseException | None]) -> None:
    """Events to a channel Redis refused: token events alone fail their item (its request is stopped, as on one
    server). An item with writes had them land already, so only its final event is gone: its client, hearing
    nothing, reads the stored result."""
    for owner, (commands, events) in enumerate(items):
        channel = next((channel for channel, _ in events if channel in refused), None)
        if channel is None or errors[owner] is not None:
            continue
        if commands:
            log.error("redis refused the final event to %s (its client reads the stored result): %s", channel,
                      _short(refused[channel]))  # fmt: skip
        else:
            errors[owner] = refused[channel]


class _Aborted(Exception):
    """The server refused a whole transaction for what it asked (EXECABORT): nothing of it was written."""

    reason: BaseException

    def __init__(self, reason: BaseException) -> None:
        super().__init__(str(reason))
        self.reason = reason


def _short(exc: BaseException) -> str:
    """A refusal as one bounded line, e.g. "NOPERM on PUBLISH: No permissions to access a channel": logs and
    stored errors never carry the command's arguments (a payload, a prompt)."""
    annotated = re.match(r"Command # \d+ \((\S+).*? of pipeline caused error: (.*)", str(exc), re.S)
    command, message = annotated.groups() if annotated else ("", str(exc))
    message = message.strip("()',\" ")
    code = "NOPERM " if isinstance(exc, NoPermissionError) else ""
    line = " ".join(f"{code}{f'on {command}: ' if command else ''}{message}".split())
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."

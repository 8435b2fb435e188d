"""Atomic admission (DESIGN.md "Admission / backpressure"): cap check, XADD and the queued result in one step.

Every submit runs `admit.lua`; concurrent submits go out together (shared.batching). A dead letter that is
retried goes through the same script, so a retry respects the cap like any new request.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis

from shared.batching import BatchedScript
from shared.codec import pack
from shared.keys import GROUP, Keys
from shared.schemas import GenerationRequest
from shared.settings import Settings

ADMIT_LUA = resources.files("producer").joinpath("admit.lua").read_text()

ADMITTED, REFUSED, EXISTS = 1, 0, 2


@dataclass(frozen=True)
class Admission:
    code: int  # ADMITTED, REFUSED (queue full) or EXISTS (an earlier submit owns this id)
    queue_len: int
    lag: int
    entry_id: str


class Admitter:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._script = BatchedScript(redis, ADMIT_LUA, "admit")

    def start(self) -> None:
        self._script.start()

    async def stop(self) -> None:
        await self._script.stop()

    async def admit(self, request: GenerationRequest, *, replacing_dead_letter: str | None = None) -> Admission:
        """Enqueue `request` unless its lane is at the cap. With `replacing_dead_letter` (a DLQ entry id),
        the request's failed result is replaced and that dead letter removed in the same atomic step."""
        keys = [self.keys.queue(request.model, request.priority), self.keys.result(request.id)]
        args: list[object] = [
            self.settings.max_queue_len,
            self.settings.max_lag,
            GROUP,
            pack(request.payload()),
            request.model,
            repr(request.created_at),
            self.settings.result_ttl_s,
        ]
        if replacing_dead_letter is not None:
            keys.append(self.keys.dlq(request.model))
            args.append(replacing_dead_letter)
        code, queue_len, lag, entry_id = await self._script(keys, args)
        entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return Admission(int(code), int(queue_len), int(lag), entry)

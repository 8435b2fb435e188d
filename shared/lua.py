"""The one way inferq loads and calls its Lua scripts.

A script is a `.lua` file in the package that uses it, read once, behind a preamble that defines the
contract's constants for it (`FINAL` the final states, `SCHEMA_VERSION`), so no script spells them out, and
the helpers more than one script needs (`add_dead_letter`, `admitted_entry`, `settle_line`).
Calls go by EVALSHA, never with the script's text: alone (`await script(redis, keys, args)`), many in one
pipeline (`script.run_all`), or as a command in someone else's transaction (`script.command`, then
`reload_missing` for the calls a NOSCRIPT refused). A NOSCRIPT reply (first use on a server, or a server
that restarted) means the call did nothing, so loading the script and sending the call again is safe.

Keys reach a script only as KEYS, formatted by `shared.keys`: a script never builds a key name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any, ClassVar

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from inferq.shared.connection import execute_all
from inferq.shared.schemas import FINAL_STATES, SCHEMA_VERSION

Call = tuple[Sequence[str], Sequence[Any]]  # (keys, args)


# Helpers every script may call. A dead letter is added, the oldest beyond `max_len` dropped, and how many
# were dropped counted, in one place: the DLQ is bounded and says what it lost.
_HELPERS = """
local function add_dead_letter(dlq, dropped, max_len, fields)
  redis.call('XADD', dlq, '*', unpack(fields))
  local trimmed = redis.call('XTRIM', dlq, 'MAXLEN', max_len)
  if trimmed > 0 then
    redis.call('INCRBY', dropped, trimmed)
  end
end

-- A bulk line its runner admitted has no result hash while it is queued: its job's id hash keeps, under the
-- line's custom_id digest, '<first line number> <epoch> <entry id> <lane stream>' (admit.lua). `ref` is the
-- line's '<digest> <epoch>' (keys.py, bulk_line). Returns the entry that owns the line and its number, or nil
-- (not such a line, or not queued: a request with a result hash reads that instead).
local function admitted_entry(ids, ref)
  if not ids or not ref or ref == '' then
    return nil
  end
  local digest, epoch = string.match(ref, '^(%S+) (%d+)$')
  local mark = digest and redis.call('HGET', ids, digest)
  if not mark then
    return nil
  end
  local line, marked_epoch, entry = string.match(mark, '^(%d+) (%d+) (.+)$')
  if marked_epoch ~= epoch then
    return nil
  end
  return entry, line
end

-- Once a queued bulk line has a result hash (started, cancelled, or ended unstarted), that is its state: its
-- field in the id hash goes back to its line number, so nothing reads it as queued again.
local function settle_line(ids, ref, line)
  redis.call('HSET', ids, string.match(ref, '^%S+'), line)
end
"""


def _preamble() -> str:
    final = ", ".join(f"{state} = true" for state in sorted(FINAL_STATES))
    return f"local FINAL = {{{final}}}\nlocal SCHEMA_VERSION = {SCHEMA_VERSION}\n{_HELPERS}"


class LuaScript:
    _loaded: ClassVar[dict[str, LuaScript]] = {}  # sha -> script: what a NOSCRIPT reply names

    def __init__(self, package: str, filename: str) -> None:
        self.name = filename
        self.source = _preamble() + resources.files(package).joinpath(filename).read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        LuaScript._loaded[self.sha] = self

    async def __call__(self, redis: Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        (reply,) = await self.run_all(redis, [(keys, args)], raise_errors=True)
        return reply

    async def run_all(self, redis: Redis, calls: Sequence[Call], *, raise_errors: bool = False) -> list[Any]:
        """Many calls in one pipeline (no transaction): one reply each, in order; a call's error is its reply
        (or raised, with `raise_errors`)."""
        commands = [self.command(keys, args) for keys, args in calls]
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        for _ in range(2):  # the second round only for what NOSCRIPT refused, once the script is loaded
            async with redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    pipe.execute_command(*commands[i])
                for i, reply in zip(todo, await execute_all(redis, pipe), strict=True):
                    replies[i] = reply
            todo = await reload_missing(redis, commands, replies)
            if not todo:
                break
        errors = [r for r in replies if isinstance(r, Exception)]
        if raise_errors and errors:
            raise errors[0]
        return replies

    async def load(self, redis: Redis) -> None:
        """Load the script now (SCRIPT LOAD is idempotent), so that its first call is not refused."""
        await redis.script_load(self.source)

    def command(self, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
        """The call as a raw command, for a pipeline or transaction built elsewhere (the worker's outbox)."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


async def reload_missing(redis: Redis, commands: Sequence[tuple[Any, ...]], replies: Sequence[Any]) -> list[int]:
    """After a pipeline of `command()`s: load every script a NOSCRIPT reply refused; returns the positions of
    those calls, which did nothing and can be sent again."""
    refused = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    for sha in {commands[i][1] for i in refused}:
        await redis.script_load(LuaScript._loaded[sha].source)
    return refused

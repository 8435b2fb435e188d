"""The one way inferq loads and calls its Lua scripts.

A script is a `.lua` file in the package that uses it, read once, behind a preamble that defines the
contract's constants for it (`FINAL` the final states, `SCHEMA_VERSION`), so no script spells them out, and
the helpers more than one script needs (`add_dead_letter`, `admitted_entry`, `settle_line`).
Calls go by EVALSHA, never with the script's text: alone (`await script(redis, keys, args)`), many in one
pipeline (`script.run_all`), or as a command in someone else's transaction (`script.command`, then
`reload_missing` for the calls a NOSCRIPT refused). A NOSCRIPT reply (first use on a server, or a server
that restarted) means the call did nothing, so loading the script and sending the call again is safe.

A script that runs once per request (the worker's start and finish) is `batched`: its file is the body of
one call, and one EVALSHA runs many calls of it in turn (`Merged`), each with its own KEYS and ARGV and its
own reply or error, as if each had been sent alone. Redis spends more on an EVALSHA itself (finding the
script, setting up the Lua call, its KEYS and ARGV tables) than on the few commands such a script runs, so
the calls of one batch share that cost. On a cluster, calls are merged only with calls whose first key is in
the same hash slot (it runs a script on that slot's node).

Keys reach a script only as KEYS, formatted by `shared.keys`: a script never builds a key name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any, ClassVar

from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from inferq.shared.connection import execute_all, is_cluster
from inferq.shared.schemas import EVENTS_HEAD, FINAL_STATES, SCHEMA_VERSION

Call = tuple[Sequence[str], Sequence[Any]]  # (keys, args)
Command = tuple[Any, ...]


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


# What a batched script's body may call, before it: `announce(channel, event)` queues a token event (one msgpack
# map, packed) for a reply channel. The events wait until every call of the EVALSHA has run, then each channel
# gets one message with all of its events (framed as shared.schemas.pack_events frames them): a client hears
# the requests that ended together in one message, not one each. A call whose channel Redis refused (NOPERM)
# gets the refusal as the last element of its reply (a table).
_ANNOUNCE = """
local announced, announcers, calling = {}, {}, 0  -- channel -> its events; channel -> the calls that sent them
local function announce(channel, event)
  if not announced[channel] then
    announced[channel], announcers[channel] = {}, {}
  end
  table.insert(announced[channel], event)
  table.insert(announcers[channel], calling)
end
"""

# The rest of a batched script, after its body (wrapped as `call_one`). ARGV: how many calls, then per call its
# key count, its arg count and its args; KEYS: every call's keys in turn. A call's error is its reply (a
# table with `err`), as a call sent alone would answer: the calls after it still run. Then the announced
# events go out, after everything the calls wrote.
_BATCH_LOOP = """
local replies, k, a = {}, 0, 1
for i = 1, tonumber(ARGV[1]) do
  local nk, na = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local keys, args = {}, {}
  for j = 1, nk do keys[j] = KEYS[k + j] end
  for j = 1, na do args[j] = ARGV[a + 2 + j] end
  k, a = k + nk, a + 2 + na
  calling = i
  local ok, reply = pcall(call_one, keys, args)
  if not ok and type(reply) ~= 'table' then
    reply = {err = tostring(reply)}
  end
  replies[i] = reply == nil and false or reply
end
for channel, events in pairs(announced) do
  local n = #events  -- an array of up to 65,535 (a uint16 length: at most _MAX_MERGED calls announce)
  local message = EVENTS_HEAD .. string.char(0xdc, math.floor(n / 256), n % 256) .. table.concat(events)
  local sent = redis.pcall('PUBLISH', channel, message)
  if type(sent) == 'table' and sent.err then
    for _, i in ipairs(announcers[channel]) do
      if type(replies[i]) == 'table' and not replies[i].err then
        table.insert(replies[i], sent.err)
      end
    end
  end
end
return replies
"""
# At most this many calls in one EVALSHA: Redis runs a script to its end before anything else, and a few
# hundred calls of a short script take it about a millisecond.
_MAX_MERGED = 256


def _preamble() -> str:
    final = ", ".join(f"{state} = true" for state in sorted(FINAL_STATES))
    head = ", ".join(str(byte) for byte in EVENTS_HEAD)
    return (
        f"local FINAL = {{{final}}}\nlocal SCHEMA_VERSION = {SCHEMA_VERSION}\n"
        f"local EVENTS_HEAD = string.char({head})\n{_HELPERS}"
    )


class LuaScript:
    _loaded: ClassVar[dict[str, LuaScript]] = {}  # sha -> script: what a NOSCRIPT reply names

    def __init__(self, package: str, filename: str, *, batched: bool = False) -> None:
        self.name = filename
        self.batched = batched
        body = resources.files(package).joinpath(filename).read_text()
        if batched:  # the file is one call's body: KEYS and ARGV are that call's, `return` gives its reply
            body = f"{_ANNOUNCE}local function call_one(KEYS, ARGV)\n{body}\nend\n{_BATCH_LOOP}"
        self.source = _preamble() + body
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
            merged = Merged([commands[i] for i in todo], by_slot=is_cluster(redis))
            async with redis.pipeline(transaction=False) as pipe:
                for command in merged.commands:
                    pipe.execute_command(*command)
                for i, reply in zip(todo, merged.split(await execute_all(redis, pipe)), strict=True):
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

    def command(self, keys: Sequence[str], args: Sequence[Any]) -> Command:
        """The call as a raw command, for a pipeline or transaction built elsewhere (the worker's outbox), which
        sends a batched script's calls through `Merged`."""
        if self.batched:
            return ("EVALSHA", self.sha, len(keys), *keys, 1, len(keys), len(args), *args)
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


class Merged:
    """Commands to send, with the calls of each batched script merged: one EVALSHA per script (and, `by_slot`,
    per hash slot: for a cluster) of at most _MAX_MERGED calls, where the first of them stood; other commands
    as they were, in order. `split` gives back one reply (or error) per command given."""

    def __init__(self, commands: Sequence[Command], *, by_slot: bool = True) -> None:
        self.commands: list[Command] = []
        self._where: list[tuple[int, int]] = []  # per command given: (its position sent, its call's index or -1)
        parts: dict[int, list[Command]] = {}  # position sent -> the calls merged there
        open_: dict[tuple[str, int], int] = {}  # (script, slot) -> the position still taking calls
        for command in commands:
            script = LuaScript._loaded.get(command[1]) if command[0] == "EVALSHA" else None
            if script is None or not script.batched:
                self._where.append((len(self.commands), -1))
                self.commands.append(command)
                continue
            group = (command[1], key_slot(command[3].encode()) if by_slot and command[2] else -1)
            position = open_.get(group)
            if position is None or len(parts[position]) >= _MAX_MERGED:
                position = open_[group] = len(self.commands)
                parts[position] = []
                self.commands.append(command)
            self._where.append((position, len(parts[position])))
            parts[position].append(command)
        for position, calls in parts.items():
            if len(calls) > 1:
                self.commands[position] = _merge(calls)

    def split(self, replies: Sequence[Any]) -> list[Any]:
        """One reply per command given, from the replies to `commands` (an error of a merged EVALSHA as a whole,
        NOSCRIPT for one, is each of its calls' error)."""
        return [
            replies[position] if index < 0 or isinstance(replies[position], Exception) else replies[position][index]
            for position, index in self._where
        ]


def _merge(calls: list[Command]) -> Command:
    """One EVALSHA for the calls (each from `command`: its keys, then 1, its key count, arg count and args)."""
    keys: list[Any] = []
    args: list[Any] = [len(calls)]
    for call in calls:
        end = 3 + call[2]
        keys += call[3:end]
        args += call[end + 1 :]
    return ("EVALSHA", calls[0][1], len(keys), *keys, *args)


async def reload_missing(redis: Redis, commands: Sequence[Command], replies: Sequence[Any]) -> list[int]:
    """After a pipeline of `command()`s: load every script a NOSCRIPT reply refused; returns the positions of
    those calls, which did nothing and can be sent again."""
    refused = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    for sha in {commands[i][1] for i in refused}:
        await redis.script_load(LuaScript._loaded[sha].source)
    return refused

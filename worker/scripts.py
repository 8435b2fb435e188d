"""The worker's Lua scripts (each file's header says what it does), loaded the one way (shared.lua)."""

from __future__ import annotations

from inferq.shared.lua import LuaScript

READ_LANES = LuaScript("inferq.worker", "read_lanes.lua")
CLAIM = LuaScript("inferq.worker", "claim.lua")
RENEW = LuaScript("inferq.worker", "renew.lua")
REAP = LuaScript("inferq.worker", "reap.lua")
START = LuaScript("inferq.worker", "start.lua", batched=True)  # once a request: many in one call
FINISH = LuaScript("inferq.worker", "finish.lua", batched=True)
DEAD_LETTER = LuaScript("inferq.worker", "dead_letter.lua")

# Loaded when a worker starts, before it reads: the outbox's final writes (FINISH, DEAD_LETTER) share a
# transaction with token events, and a script the server has to load first would let a final event reach its
# client before the result it announces is stored. START goes through it too (a start not awaited), ahead of
# its request's final write.
OUTBOX_SCRIPTS = (START, FINISH, DEAD_LETTER)

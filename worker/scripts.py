"""The worker's Lua scripts, read once from the package (each file's header says what it does)."""

from __future__ import annotations

from importlib import resources


def lua(name: str) -> str:
    return resources.files("inferq.worker").joinpath(name).read_text()


READ_LANES = lua("read_lanes.lua")
CLAIM = lua("claim.lua")
RENEW = lua("renew.lua")
REAP = lua("reap.lua")
START = lua("start.lua")
FINISH = lua("finish.lua")

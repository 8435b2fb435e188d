"""Worker-side flow control: how many requests to hold, from what the engine says about its load.

A worker never reads more entries than it has free slots. The slot count starts at max_inflight; when the
engine's KV cache is nearly full or it preempted requests since the last look, the worker takes fewer
(what it holds beyond the engine's room would only wait inside the engine, while another worker could run
it); when the cache has room again it raises the count back step by step.
"""

from __future__ import annotations

from dataclasses import dataclass

HIGH_WATER = 0.90  # KV cache use above which the worker backs off
LOW_WATER = 0.70  # ... and below which it takes more again


@dataclass(frozen=True)
class EngineLoad:
    kv_cache_usage: float  # 0..1
    preemptions: int  # since the engine started
    running: int
    waiting: int


class SlotControl:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.slots = capacity
        self._preemptions = 0

    def update(self, load: EngineLoad | None, inflight: int) -> bool:
        """Adjust `slots` to the engine's latest load; True if it changed."""
        if load is None:
            return False
        before = self.slots
        preempted = load.preemptions > self._preemptions
        self._preemptions = load.preemptions
        if preempted or load.kv_cache_usage > HIGH_WATER:
            # Hold no more than what runs now, less a quarter: the engine had no room for the rest.
            self.slots = max(1, min(self.slots, int(max(inflight, 1) * 0.75)))
        elif load.kv_cache_usage < LOW_WATER and self.slots < self.capacity:
            self.slots = min(self.capacity, self.slots + max(1, self.capacity // 8))
        return self.slots != before

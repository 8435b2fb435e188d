"""Priority lanes with a floor (docs/CONTRACTS.md, "Delivery").

Free slots are filled from the high lane first, then normal, then low; but while a lower lane has work it
is owed at least `lane_min_share` of the starts, so a flood of high-priority work slows it down without
starving it. The debt is counted only while the lane has work: a lane found empty owes and is owed nothing.
"""

from __future__ import annotations

import math

from inferq.shared.keys import LANES


class LaneShares:
    def __init__(self, min_share: float) -> None:
        self.min_share = min_share
        self.starts = [0.0] * len(LANES)  # entries started per lane (high, normal, low)
        self.total = 0.0

    def reservations(self, free: int) -> list[int]:
        """How many of `free` slots to offer each lane first (the highest lane is never owed anything)."""
        reserved = [0] * len(LANES)
        if self.min_share <= 0:
            return reserved
        left = free
        floor = self.min_share * (self.total + free)
        for i in range(len(LANES) - 1, 0, -1):  # the lowest lane first: it is the one most at risk
            owed = math.ceil(floor - self.starts[i] - 1e-9)
            reserved[i] = max(0, min(owed, left))
            left -= reserved[i]
        return reserved

    def record(self, reserved: list[int], got: list[int]) -> None:
        """Count what a read started; forgive the debt of a lane that had less work than it was offered."""
        for i, n in enumerate(got):
            self.starts[i] += n
            self.total += n
        for i, offered in enumerate(reserved):
            if offered and got[i] < offered:
                self.starts[i] = max(self.starts[i], self.min_share * self.total)


def plan_reads(unread: list[list[int]], free: int, reserved: list[int], first: int = 0) -> list[list[int]]:
    """How many entries to read from each lane of each shard (`unread[shard][lane]`, highest lane first), so
    that the shards together keep the lane priorities and floors one shard keeps: a lane's reservation first,
    then the free slots from the highest lane down, each lane's share taken from its shards in turn from
    `first` (so no shard is always read last)."""
    shards = len(unread)
    plan = [[0] * len(LANES) for _ in range(shards)]
    left = free

    def give(lane: int, want: int) -> None:
        nonlocal left
        want = min(want, left)
        while want > 0:
            before = want
            for k in range(shards):
                shard = (first + k) % shards
                if want and plan[shard][lane] < unread[shard][lane]:
                    plan[shard][lane] += 1
                    want -= 1
                    left -= 1
            if want == before:
                return  # every shard's lane is spent

    for lane, n in enumerate(reserved):
        give(lane, n)
    for lane in range(len(LANES)):
        give(lane, left)
    return plan

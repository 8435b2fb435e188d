"""Lane shares alone (worker/lanes.py): the high lane goes first, a lower lane with work keeps its floor."""

from __future__ import annotations

from inferq.worker.lanes import LaneShares, plan_reads

HIGH, NORMAL, LOW = 0, 1, 2


def serve(shares: LaneShares, free: int, work: list[int]) -> list[int]:
    """One read as read_lanes.lua does it: reserved slots first (as far as each lane has work), then the rest
    highest lane first. Returns what each lane started; `work` is what is left queued."""
    reserved = shares.reservations(free)
    got = [min(r, w) for r, w in zip(reserved, work, strict=True)]
    left = free - sum(got)
    for lane in (HIGH, NORMAL, LOW):
        extra = min(left, work[lane] - got[lane])
        got[lane] += extra
        left -= extra
    shares.record(reserved, got)
    for lane in (HIGH, NORMAL, LOW):
        work[lane] -= got[lane]
    return got


def test_no_floor_means_strict_priority() -> None:
    shares = LaneShares(0.0)
    assert shares.reservations(8) == [0, 0, 0]
    work = [100, 100, 100]
    assert serve(shares, 8, work) == [8, 0, 0]


def test_lower_lanes_keep_their_floor_under_a_high_flood() -> None:
    shares = LaneShares(0.1)
    work = [10_000, 10_000, 10_000]
    started = [0, 0, 0]
    for _ in range(100):
        for lane, n in enumerate(serve(shares, 10, work)):
            started[lane] += n
    total = sum(started)
    assert total == 1000
    assert started[NORMAL] >= 100 and started[LOW] >= 100  # at least 10% each
    assert started[HIGH] > started[NORMAL] and started[HIGH] > started[LOW]  # the rest went to the top lane


def test_a_lane_without_work_is_owed_nothing_later() -> None:
    """Debt counts only while a lane has work: a low lane empty for a long time does not then take over."""
    shares = LaneShares(0.1)
    work = [10_000, 0, 0]
    for _ in range(100):
        serve(shares, 10, work)
    work[LOW] = 10_000  # low work arrives after 1000 high starts
    got = serve(shares, 10, work)
    assert got[LOW] <= 2  # its floor share of these starts, not the 100 it "missed"


def test_the_highest_lane_is_never_reserved_anything() -> None:
    shares = LaneShares(0.5)
    assert shares.reservations(10)[HIGH] == 0
    assert sum(shares.reservations(10)) <= 10


def test_shards_read_together_keep_the_lane_priorities() -> None:
    # unread[shard][lane]: shard 1 has only low work, shards 0 and 2 have high work.
    unread = [[2, 0, 5], [0, 0, 5], [4, 1, 0]]
    assert plan_reads(unread, 6, [0, 0, 0]) == [[2, 0, 0], [0, 0, 0], [4, 0, 0]]  # every high entry first
    assert plan_reads(unread, 8, [0, 0, 0]) == [[2, 0, 1], [0, 0, 0], [4, 1, 0]]
    # A floor for the low lane comes out of the free slots first, from the shards in turn.
    assert plan_reads(unread, 6, [0, 0, 2]) == [[2, 0, 1], [0, 0, 1], [2, 0, 0]]


def test_shards_take_turns_and_nothing_is_planned_beyond_what_is_unread() -> None:
    even = [[0, 0, 5]] * 3
    assert plan_reads(even, 4, [0, 0, 0], first=0) == [[0, 0, 2], [0, 0, 1], [0, 0, 1]]
    assert plan_reads(even, 4, [0, 0, 0], first=1) == [[0, 0, 1], [0, 0, 2], [0, 0, 1]]
    assert plan_reads([[1, 0, 0], [0, 0, 0]], 10, [0, 0, 0]) == [[1, 0, 0], [0, 0, 0]]

"""Worker flow control alone (worker/flow.py): no Redis, no engine."""

from __future__ import annotations

from inferq.worker.flow import EngineLoad, SlotControl


def load(kv: float, preemptions: int = 0, running: int = 0) -> EngineLoad:
    return EngineLoad(kv_cache_usage=kv, preemptions=preemptions, running=running, waiting=0)


def test_slot_control_backs_off_on_pressure_and_recovers() -> None:
    flow = SlotControl(capacity=64)
    assert not flow.update(None, 64) and flow.slots == 64  # an engine that reports nothing: no change
    assert flow.update(EngineLoad(kv_cache_usage=0.95, preemptions=0, running=64, waiting=0), 64)
    assert flow.slots == 48
    assert flow.update(EngineLoad(kv_cache_usage=0.8, preemptions=3, running=48, waiting=5), 48)
    assert flow.slots == 36  # preempted since the last look: back off again
    assert not flow.update(EngineLoad(kv_cache_usage=0.8, preemptions=3, running=36, waiting=0), 36)
    for _ in range(10):
        flow.update(EngineLoad(kv_cache_usage=0.3, preemptions=3, running=30, waiting=0), 30)
    assert flow.slots == 64  # room again: raised back step by step, never past the capacity


def test_slot_control_never_goes_below_one_slot() -> None:
    flow = SlotControl(capacity=4)
    for preempted in range(1, 6):
        flow.update(load(0.99, preemptions=preempted), inflight=0)
    assert flow.slots == 1


def test_slot_control_holds_between_the_water_marks() -> None:
    flow = SlotControl(capacity=16)
    flow.update(load(0.95), inflight=16)
    assert flow.slots == 12
    assert not flow.update(load(0.80), inflight=12)  # neither full nor roomy: stay
    assert flow.slots == 12
    assert flow.update(load(0.69), inflight=12) and flow.slots == 14  # a step of capacity // 8

"""shared/aio.py's cancel_and_wait, which every lifecycle (outbox, subscription, batcher, worker) stops its
background tasks with: the task's own cancel is expected, a cancel of the one stopping it is not."""

from __future__ import annotations

import asyncio

import pytest

from inferq.shared.aio import cancel_and_wait


async def test_the_tasks_own_cancel_is_not_raised() -> None:
    running = asyncio.Event()

    async def forever() -> None:
        running.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(forever())
    await running.wait()
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_a_cancel_of_the_caller_during_the_wait_is_passed_on() -> None:
    """A task slow to stop (a last flush on its way out) and its stopper cancelled meanwhile, as by Ctrl-C: the
    stopper must end cancelled, not return as if it had finished, or whoever cancelled it is ignored."""
    running, stopping, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            running.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopping.set()
            await release.wait()  # the stopper's cancel reaches this wait too, and ends the task
            raise

    task = asyncio.create_task(slow_to_stop())
    await running.wait()
    stopper = asyncio.create_task(cancel_and_wait(task))
    await stopping.wait()
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert stopper.cancelled() and task.cancelled() and not release.is_set()

"""Running a coroutine as a program: on uvloop where it is installed (it ships with vLLM), else asyncio.

uvloop makes each task wake-up cheaper; a worker or client does one per request per engine step."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has stopped (its CancelledError is expected, not raised)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def unless(event: asyncio.Event, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None if `event` is set first (`work` is then cancelled: use this only for work
    that is safe to cut short, such as a blocking read that takes nothing)."""
    task = asyncio.ensure_future(work)
    if event.is_set():
        task.cancel()
    else:
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)
        return None
    return task.result()

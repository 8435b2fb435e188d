"""Running a coroutine as a program: on uvloop where it is installed (it ships with vLLM), else asyncio.

uvloop makes each task wake-up cheaper; a worker or client does one per request per engine step."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def run(coro: Coroutine[Any, Any, T], *, sigterm_cancels: bool = True) -> T:
    """Run `coro` as the program. SIGTERM stops it as Ctrl-C does: its task is cancelled, so every `async with`
    unwinds (a `--local` worker is stopped, an in-process engine shut down) instead of the process vanishing
    and leaving those children running; then SystemExit(143), the shell's code for "ended by SIGTERM".
    A worker passes `sigterm_cancels=False`: it owns its signals (worker/run.py), from before its engine loads
    (minutes) until it has drained."""
    sigterm = _SigtermCancels()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        try:
            return runner.run(sigterm.guard(coro) if sigterm_cancels else coro)
        except asyncio.CancelledError:
            if sigterm.received:
                raise SystemExit(128 + signal.SIGTERM) from None
            raise


class _SigtermCancels:
    received = False

    async def guard(self, coro: Coroutine[Any, Any, T]) -> T:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            self.received = True
            task.cancel()

        try:
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
            installed = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            installed = False
        try:
            return await coro
        finally:
            if installed:
                loop.remove_signal_handler(signal.SIGTERM)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has stopped. Its CancelledError is expected and not raised;
    a cancel of the caller itself during the wait (a Ctrl-C, a caller's deadline) still is."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        caller = asyncio.current_task()
        if caller is not None and caller.cancelling():
            raise


async def first(work: Awaitable[T], stop: Awaitable[Any]) -> tuple[bool, T | None]:
    """Run `work` until `stop` completes: (True, its result) if `work` finished first (its exception is
    raised), else (False, None) with `work` cancelled. For work that is safe to cut short."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop)
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False, None
    return True, task.result()


async def unless(event: asyncio.Event, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None if `event` is set first (`work` is then cancelled: use this only for work
    that is safe to cut short, such as a blocking read that takes nothing)."""
    _, value = await first(work, event.wait())
    return value

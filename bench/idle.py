"""Each target of `inferq bench online` alone on the machine: the targets whose turn it is not are frozen.

`bench_online` keeps every target up for the whole run and gives them turns, so that a slow minute of the
machine lands on all of them. An idle vLLM engine is not idle, though: the model process's 13 `gloo_tcp_loop`
threads keep waking, 1-2% of a core per idle engine (docs/benchmark-history.md, "Idle targets are not quite idle"), and
on this box they wake on the core where the running target's model computes. Which group the kernel
schedules them in differs by target (the `--local` inferq worker's session is its own group, at nice 5;
direct's engine and the OpenAI server share the bench's), so they did not cost every target alike. Starting
each target afresh for its turn would cost ~45 s a start on SmolLM2 (measured). So the bench stops
(SIGSTOP) every process of the targets whose turn it is not, and continues them (SIGCONT) before their own
turn and before any target is shut down: a stopped process does not act on SIGTERM.

A target's processes are those this process gained while the target was set up (the OpenAI server, the
local worker, direct's engine core), with whatever they have started since. A target reached over the
network (`--url`, running workers) has none here and is not frozen. The process tree comes from psutil.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterable

import psutil


def descendants(roots: Iterable[int]) -> set[int]:
    """`roots` (those still alive) and every process below them."""
    found: set[int] = set()
    for pid in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update([pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))])
    return found


def cpu_seconds(roots: Iterable[int]) -> float:
    """User + system CPU seconds of `roots` and every process below them: those alive now, and those that ended
    and were waited for (a Redis's AOF rewrites, each a child process that lives a few seconds)."""
    total = 0.0
    for pid in descendants(roots):
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def _parent(pid: int) -> int | None:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).ppid()
    return None


def _stopped_or_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return True


def _resource_tracker(pid: int) -> bool:
    try:
        return any("resource_tracker" in part for part in psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


class IdleFreezer:
    """Which processes belong to which target, and which targets are frozen now."""

    def __init__(self) -> None:
        self.roots: dict[str, set[int]] = {}
        self.frozen: set[str] = set()

    @contextlib.asynccontextmanager
    async def setting_up(self, name: str) -> AsyncIterator[None]:
        """Around a target's set-up: the processes that appear under this one during it are the target's."""
        before = descendants([os.getpid()])
        yield
        # Not what a target set up before started meanwhile (a worker's engine may still be spawning when it
        # reports ready), nor this process's multiprocessing resource tracker, started by the first engine to
        # spawn: every later one here writes to it.
        earlier = descendants({pid for roots in self.roots.values() for pid in roots})
        new = descendants([os.getpid()]) - before - earlier
        self.roots[name] = {pid for pid in new if _parent(pid) not in new and not _resource_tracker(pid)}

    def pids(self, name: str) -> set[int]:
        return descendants(self.roots.get(name, ()))

    async def alone(self, name: str) -> None:
        """`name` runs, every other target is frozen once this returns."""
        self._signal([name], signal.SIGCONT)  # continued at once: the kernel wakes it as it sends the signal
        self.frozen.discard(name)
        others = [t for t in self.roots if t != name and t not in self.frozen]
        stopping = self._signal(others, signal.SIGSTOP)
        self.frozen.update(others)
        # A process stops only when it next runs and takes the signal: wait for it (state "T"), for up to 1 s.
        for _ in range(1000):
            stopping = {pid for pid in stopping if not _stopped_or_gone(pid)}
            if not stopping:
                return
            await asyncio.sleep(0.001)

    def thaw_all(self) -> None:
        self._signal(self.frozen, signal.SIGCONT)
        self.frozen.clear()

    def _signal(self, names: Iterable[str], sig: signal.Signals) -> set[int]:
        sent = set()
        for name in list(names):
            for pid in self.pids(name):
                with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                    os.kill(pid, sig)
                    sent.add(pid)
        return sent

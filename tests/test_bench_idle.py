"""`inferq bench online` runs each target alone: the processes of the targets whose turn it is not are stopped
(inferq.bench.idle), and every one runs again before the targets are shut down. The targets here are real
processes with a child each (as a vLLM engine core has its model process), one of which starts its child
only while the next target is being set up (as a worker's engine may still be spawning when it says ready)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inferq.bench.online import Send, Target, bench_online, fixed_prompts
from inferq.bench.stats import Prompt, Timing

# Waits for signals; starts its child (which only waits too) when a line arrives on stdin, prints its pid.
PARENT = """
import signal, subprocess, sys
sys.stdin.readline()
child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
print(child.pid, flush=True)
signal.pause()
"""


def state(pid: int) -> str:
    """The kernel's one-letter state of `pid`: T when stopped."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


class Targets:
    """Targets whose processes record, at each request, which of them are stopped."""

    def __init__(self) -> None:
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.children: dict[str, int] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []  # per request: its target, every process's state

    def states(self) -> dict[str, str]:
        """Every live target process's state, by name ("a", "a-child", ...)."""
        pids = {**{n: p.pid for n, p in self.procs.items()}, **{f"{n}-child": c for n, c in self.children.items()}}
        return {n: state(pid) for n, pid in pids.items()}

    async def start_child(self, name: str) -> None:
        proc = self.procs[name]
        assert proc.stdin and proc.stdout
        proc.stdin.write(b"go\n")
        self.children[name] = int(await proc.stdout.readline())

    def target(self, name: str, *, child_later: bool = False, start_too: str | None = None) -> Target:
        """A target of a process and its child; with `child_later`, the child starts only when another target
        set up later starts it (`start_too`)."""

        @contextlib.asynccontextmanager
        async def up() -> AsyncIterator[Send]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", PARENT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            self.procs[name] = proc
            if start_too:
                await self.start_child(start_too)
            if not child_later:
                await self.start_child(name)

            async def send(prompt: Prompt, timing: Timing) -> None:
                self.seen.append((name, self.states()))
                timing.token(time.perf_counter(), prompt.max_tokens)

            try:
                yield send
            finally:
                # Stopped, it would not act on SIGTERM until continued: this wait would time out.
                self.seen.append(("down", self.states()))
                os.kill(self.children.pop(name), signal.SIGKILL)
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 10)
                del self.procs[name]

        return up


@pytest.mark.parametrize("freeze_idle", [True, False])
async def test_each_target_runs_alone(freeze_idle: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("inferq.bench.online.SETTLE_S", 0)  # nothing here busy-waits after its turn
    targets = Targets()
    prompts = fixed_prompts(4, 3, 2)
    report = await bench_online(
        {"a": targets.target("a", child_later=True), "b": targets.target("b", start_too="a"), "c": targets.target("c")},
        prompts[1:], prompts[:1], model="fake", concurrencies=[1, 2], rate=None, rounds=2, freeze_idle=freeze_idle,
    )  # fmt: skip
    assert [(r["target"], r["completed"], r["output_tokens"]) for r in report["runs"]] == [
        (t, 3, 6) for t in ("a", "b", "c", "b", "c", "a", "b", "c", "a", "c", "a", "b")
    ]
    assert report["freeze_idle"] is freeze_idle
    requests = [(name, states) for name, states in targets.seen if name != "down"]
    assert len(requests) == 3 * 1 + 12 * (1 + 3)  # each target's first warm-up, then each run's warm-up and run
    for name, states in requests:
        for process, st in states.items():
            own = process.split("-")[0] == name
            assert (st == "T") == (freeze_idle and not own), (name, process, st)
    downs = [states for name, states in targets.seen if name == "down"]
    assert len(downs) == 3 and all(st != "T" for states in downs for st in states.values())

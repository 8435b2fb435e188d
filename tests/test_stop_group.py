"""`--local` children (a worker, vLLM's OpenAI server) and the bulk bench's tools are stopped whole: nothing of
their process group outlives the command, whichever way it ends. The group here is a shell leading its own
group, with a member that ignores SIGTERM, as a vLLM engine core left behind by a dead worker would outlive it."""

from __future__ import annotations

import asyncio
import os
import select
import shlex
import sys
from pathlib import Path

import pytest

from inferq.bench.bulk import timed
from inferq.producer.local import stop_group


async def leader_with_member(leader_ignores_term: bool) -> tuple[asyncio.subprocess.Process, int]:
    """The leader, and a pidfd of its member (readable once the member has exited)."""
    trap = 'trap "" TERM; ' if leader_ignores_term else ""
    # The member prints its pid once it ignores SIGTERM, then becomes a long sleep that still ignores it.
    # (Its stdout then goes elsewhere: asyncio waits for the leader's pipes to close before its exit counts.)
    script = f"""{trap}sh -c 'trap "" TERM; echo $$; exec sleep 600 >/dev/null' & wait"""
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", script, start_new_session=True, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    return proc, os.pidfd_open(int(await proc.stdout.readline()))


def gone(member: int) -> bool:
    """Whether the member exits within 10 s: a signal is delivered after kill() returns."""
    try:
        return bool(select.select([member], [], [], 10)[0])
    finally:
        os.close(member)


@pytest.mark.parametrize("whole_group", [False, True])
async def test_a_member_that_outlives_its_leader_is_killed(whole_group: bool) -> None:
    proc, member = await leader_with_member(leader_ignores_term=False)
    await stop_group(proc, grace_s=60, whole_group=whole_group)
    assert proc.returncode == -15  # the leader stopped on SIGTERM, within the grace time
    assert gone(member)


async def test_the_group_is_killed_when_the_wait_is_cancelled() -> None:
    proc, member = await leader_with_member(leader_ignores_term=True)
    stopping = asyncio.create_task(stop_group(proc, grace_s=600))
    await asyncio.sleep(0)  # it runs up to its wait for the leader, which ignored the SIGTERM
    assert proc.returncode is None and not stopping.done()
    stopping.cancel()  # as a Ctrl-C or a caller's deadline would
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert proc.returncode == -9
    assert gone(member)


@pytest.mark.parametrize("cancelled", [False, True])
async def test_bench_bulk_leaves_no_member_of_its_tools_group(tmp_path: Path, cancelled: bool) -> None:
    """`inferq bench bulk` times each tool as a child leading its own group: when the child exits, or the bench
    is cancelled (SIGTERM, Ctrl-C), a member that ignores SIGTERM (an engine core) does not outlive it."""
    reported: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reported.set_result(int(await reader.read()))
        writer.close()

    sock = str(tmp_path / "member.sock")
    member = (
        "import os, signal, socket, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"s = socket.socket(socket.AF_UNIX); s.connect({sock!r}); s.sendall(str(os.getpid()).encode()); s.close(); "
        "time.sleep(600)"
    )
    # The leader starts the member, then waits for it (cancelled) or exits once it has reported (not).
    leader = f"{sys.executable} -c {shlex.quote(member)} & " + ("wait" if cancelled else f"read _ < {tmp_path}/go")
    os.mkfifo(tmp_path / "go")
    async with await asyncio.start_unix_server(on_connect, sock):
        timing = asyncio.create_task(timed(["/bin/sh", "-c", leader], dict(os.environ), tmp_path / "log"))
        pid = await asyncio.wait_for(reported, 60)
        pidfd = os.pidfd_open(pid)
        if cancelled:
            timing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await timing
        else:
            (tmp_path / "go").write_text("\n")  # the leader reads it and exits 0, its member still running
            assert await timing > 0
    assert gone(pidfd)

"""`--local` children (a worker, vLLM's OpenAI server) are stopped whole: nothing of their process group outlives
the command, whichever way it ends. The group here is a shell leading its own session, with a member that
ignores SIGTERM, as a vLLM engine core left behind by a dead worker would outlive it."""

from __future__ import annotations

import asyncio
import os
import select

import pytest

from producer.local import stop_group


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

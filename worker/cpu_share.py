"""Keeping a CPU engine from starving its neighbours on the same machine.

vLLM's CPU engine busy-polls: the engine core spins (sched_yield) while the model process computes, so the
worker's processes are always runnable. Under Linux's autogroup scheduling (on by default on desktop and
many server kernels) every session is one scheduling group, and a session that never sleeps was measured
to keep other sessions (the Redis server, the clients) off the CPU for 100-670 ms at a time on a 2-core
box: every token event of a request then reaches the client at its end. With the worker's group at nice 5
the stalls were gone (docs/benchmark-history.md, "Concurrency 1 streamed in bursts"). Yielding inside the group does
not help: sched_yield only reorders tasks within their own group.

The nice value belongs to the whole session, so it is set only when the worker leads its own session (as
a service, `--local`, the bench and the tests start it); a worker started from a terminal shares the
shell's group and leaves it alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("inferq.worker")

AUTOGROUP = Path("/proc/self/autogroup")


def yield_to_neighbours(nice: int, autogroup: Path = AUTOGROUP) -> bool:
    """Give this session's scheduling group the nice value `nice` (0: leave it). True if it was set."""
    if nice <= 0 or not autogroup.exists() or os.getsid(0) != os.getpid():
        return False
    try:
        autogroup.write_text(str(nice))
    except OSError as exc:  # not permitted (a lower value than now needs privileges), or no autogroups
        log.info("could not set the worker's scheduling group to nice %d (%s); leaving it", nice, exc)
        return False
    log.info(
        "worker session's scheduling group at nice %d, so Redis and clients on this machine are not starved "
        "by the engine's busy polling (INFERQ_WORKER_NICE)",
        nice,
    )
    return True

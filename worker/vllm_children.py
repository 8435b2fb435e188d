"""vLLM's engine processes die with the worker that started them, however it dies (docs/CONTRACTS.md,
"Shutdown"): a SIGKILLed worker used to leave its engine core and model process running, about 2.4 GB each
time on a CPU box and a whole GPU's memory on a GPU box.

vLLM spawns its engine core (and, where the model runs in a process of its own, that process) as fresh Python
processes, and loads its *general plugins* in each before it does anything else. This one, in a process
started while an inferq engine starts vLLM (`die_with_this_process`, which hands the starting process's pid
down in a private environment variable), asks Linux for SIGKILL when its parent dies (PR_SET_PDEATHSIG), and
exits at once if the parent is gone already. Linux sends that signal when the *thread* that started the
child ends: an inferq engine starts vLLM from a thread of its own that lives as long as the engine
(worker/vllm_engine.py). Each level guards itself: the model process dies with the engine core, the engine
core with the worker. Any other vLLM run in this environment is left as it ships. No vLLM
name is touched: only the operating system's.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Iterator

log = logging.getLogger("vllm.inferq")

HANDOFF = "_INFERQ_ENGINE_PARENT"  # the pid of the process that starts vLLM, while it starts it
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@contextlib.contextmanager
def handed_down(name: str, value: str | None) -> Iterator[None]:
    """`name` set to `value` (None: unset) in this process's environment while vLLM starts, so the engine
    processes it spawns inherit it; put back afterwards, so nothing this process starts later (the bench's
    other targets) does. How an inferq engine tells its vLLM plugins what to do."""
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def die_with_this_process() -> contextlib.AbstractContextManager[None]:
    """While vLLM starts: every engine process it spawns dies with this process (and theirs with them)."""
    return handed_down(HANDOFF, str(os.getpid()))


def apply() -> None:
    """The `vllm.general_plugins` entry point: in a vLLM process an inferq engine started, die with the parent."""
    starter = os.environ.get(HANDOFF)
    if not starter or starter == str(os.getpid()) or not sys.platform.startswith("linux"):
        return  # not started by an inferq engine, or the starting process itself
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except Exception as exc:  # vLLM calls plugins unguarded: it must still start
        log.warning("this engine process may outlive its worker: PR_SET_PDEATHSIG failed (%s)", exc)
        return
    if os.getppid() == 1:  # the parent died before the guard was set: nobody will read what this computes
        os._exit(1)


def stop_started() -> None:
    """Tell every process this one started (vLLM's engine core and model process, perhaps still starting) to stop:
    SIGTERM, which vLLM's processes handle by shutting down, or die of. For a worker stopped while its engine
    loads, whose engine processes may not have loaded this plugin yet."""
    import psutil  # vLLM's own dependency

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.terminate()

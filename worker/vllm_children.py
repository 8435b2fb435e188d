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

What an engine leaves in the file system goes too: its socket files, in a directory of its own (`own_ipc_dir`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
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
    """While vLLM starts: every engine process it spawns or forks dies with this process (and theirs with them)."""
    _guard_forks()
    return handed_down(HANDOFF, str(os.getpid()))


def apply() -> None:
    """The `vllm.general_plugins` entry point (and, in a forked child, the fork hook): in a vLLM process an inferq
    engine started, die with the parent."""
    parent = os.environ.get(HANDOFF)
    if not parent or parent == str(os.getpid()) or not sys.platform.startswith("linux"):
        return  # not started by an inferq engine, or the starting process itself
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except Exception as exc:  # vLLM calls plugins unguarded: it must still start
        log.warning("this engine process may outlive its worker: PR_SET_PDEATHSIG failed (%s)", exc)
        return
    os.environ[HANDOFF] = str(os.getpid())  # the parent this process's own engine processes check for
    if str(os.getppid()) != parent:  # the parent died before the guard was set (its orphan went to init or a
        os._exit(1)  # subreaper): nobody will read what this computes


_forks_guarded = False


def _guard_forks() -> None:
    """vLLM forks its engine core where it can (on a GPU unless CUDA is up already; a CPU always spawns). A forked
    child inherits vLLM's "plugins loaded" flag and never loads this plugin, so the guard goes on right after the
    fork instead, in any child forked while an engine starts (HANDOFF set)."""
    global _forks_guarded
    if not _forks_guarded:
        os.register_at_fork(after_in_child=apply)
        _forks_guarded = True


def child_pids() -> set[int]:
    """This process's children and theirs, now."""
    import psutil  # vLLM's own dependency

    return {child.pid for child in psutil.Process().children(recursive=True)}


def kill_started(before: set[int]) -> None:
    """SIGKILL the processes this one started since `before` (`child_pids()` then): an engine whose start was
    given up. vLLM's engine core takes SIGTERM during its load only as a note to stop once loaded, and these have
    served nothing. multiprocessing's resource tracker is spared: it removes what they left in shared memory
    once they are gone, then exits."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.pid not in before and "multiprocessing.resource_tracker" not in " ".join(child.cmdline()):
                child.kill()


_IPC_DIR = re.compile(r"inferq-vllm-(\d+)-\w+")


def own_ipc_dir() -> str:
    """A new directory for an engine's ZeroMQ socket files, named after this process, under vLLM's base for them
    (VLLM_RPC_BASE_PATH, else the temp dir). vLLM binds its sockets to files there and leaves them when it stops
    (libzmq does not unlink them): three a start, thousands on a box whose workers restart. The engine removes
    its directory when it stops; those of engines whose process is gone (SIGKILLed: nothing removed theirs) go
    here, before the new one is made."""
    base = os.environ.get("VLLM_RPC_BASE_PATH") or tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            owner = _IPC_DIR.fullmatch(entry.name)
            if owner and entry.is_dir(follow_symlinks=False) and not _alive(int(owner.group(1))):
                shutil.rmtree(entry.path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"inferq-vllm-{os.getpid()}-", dir=base)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive, and not ours to judge
        return True
    return True

"""vLLM's engine processes die with the worker that started them (worker/vllm_children.py), however vLLM starts
them. A spawned one loads our vLLM plugin (test_vllm.py kills a worker and watches its engine go); a forked one,
as vLLM starts its engine core on a GPU, inherits vLLM's "plugins loaded" flag and never does, so the guard goes
on in the fork hook. That is checked here with a plain fork, in an interpreter of its own: no GPU needed."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A thread forks while an engine starts (as vLLM's build does, in the engine's thread), then ends once the child
# has said what it sees: the child's parent-death signal, and whether its own children would check for it.
FORK_IN_A_THREAD = """
import ctypes, os, threading, time
from inferq.worker import vllm_children

said, child = os.pipe(), []

def build():
    with vllm_children.die_with_this_process():
        pid = os.fork()
        if pid == 0:  # as multiprocessing's fork does, the child never returns from here
            signum = ctypes.c_int()
            ctypes.CDLL(None).prctl(2, ctypes.byref(signum), 0, 0, 0)  # PR_GET_PDEATHSIG
            handed = os.environ.get(vllm_children.HANDOFF) == str(os.getpid())
            os.write(said[1], f"{signum.value} {handed}".encode())
            time.sleep(60)
            os._exit(0)
    child.append(pid)
    print(os.read(said[0], 100).decode(), flush=True)

thread = threading.Thread(target=build)
thread.start()
thread.join()  # the thread that forked the child has ended: the child must die of it
_, status = os.waitpid(child[0], 0)
print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else f"exited {os.WEXITSTATUS(status)}")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_forked_while_an_engine_starts_dies_with_the_thread_that_forked_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FORK_IN_A_THREAD], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(int(signal.SIGKILL)), "True", str(int(signal.SIGKILL))], done.stdout

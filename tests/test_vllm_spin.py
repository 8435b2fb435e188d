"""INFERQ_ENGINE_SPIN_MS reaches vLLM's busy-wait window through our vLLM plugin (worker/vllm_spin.py).

The plugin changes a class in vLLM, so each case runs in its own interpreter, on vLLM's real SpinCondition.
That the engine processes of a running worker load it is checked on the tiny worker's log in test_vllm.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from inferq.worker import vllm_spin

ROOT = Path(__file__).resolve().parent.parent

# The reader side of one of vLLM's shared-memory queues, built as vLLM builds it (keywords only), one built
# with an explicit window, how many times vLLM's __init__ is wrapped, and, when patched, whether a reader
# that goes to sleep with no message coming wakes up again by itself (vLLM's own sleeps until pinged).
PROBE = """
import logging, os, time
import zmq
logging.basicConfig(level=logging.INFO)  # vLLM's own logging is set up with its engine, not on import
from inferq.worker import vllm_spin
vllm_spin.apply()
vllm_spin.apply()  # vLLM may load plugins more than once in a process: still one wrapper
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
ctx = zmq.Context()
plain = SpinCondition(is_reader=True, context=ctx, notify_address="inproc://inferq-spin-a")
chosen = SpinCondition(is_reader=True, context=ctx, notify_address="inproc://inferq-spin-b", busy_loop_s=0.5)
init, wrappers = SpinCondition.__init__, 0
while hasattr(init, "__wrapped__"):
    init, wrappers = init.__wrapped__, wrappers + 1
woke = "-"
if wrappers:
    time.sleep(plain.busy_loop_s * 2)  # past the window, within vLLM's busy second: the next wait sleeps
    plain.wait()  # no timeout and no ping: returns only because the plugin bounds the sleep
    woke = "woke"
print(plain.busy_loop_s, chosen.busy_loop_s, wrappers, woke, flush=True)
os._exit(0)  # no zmq teardown: once in a CI run, destroying the context with vLLM's sockets open aborted
"""


def probe(env_add: dict[str, str]) -> tuple[list[str], str]:
    env = {k: v for k, v in os.environ.items() if k not in (vllm_spin.HANDOFF, "INFERQ_ENGINE_SPIN_MS")}
    env.update(env_add)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"probe exited {out.returncode}; stdout {out.stdout!r}; stderr:\n{out.stderr[-3000:]}"
    return out.stdout.split(), out.stderr


def test_the_window_is_set_and_an_explicit_one_is_kept() -> None:
    words, log = probe({vllm_spin.HANDOFF: "0.0025"})
    assert words == ["0.0025", "0.5", "1", "woke"], log  # applied twice, vLLM's __init__ is wrapped once
    assert "busy-waits 2.5 ms" in log


@pytest.mark.parametrize("value", ["", "fast", "-1", "nan"])
def test_without_a_valid_window_vllm_spins_as_it_ships(value: str) -> None:
    words, log = probe({vllm_spin.HANDOFF: value})
    assert words == ["1", "0.5", "0", "-"], log  # vLLM's own default window is 1 s, its class untouched
    if value:
        assert "busy-wait left as it ships" in log


def test_a_users_setting_alone_does_not_reach_other_vllm_runs() -> None:
    # INFERQ_ENGINE_SPIN_MS exported in a shell must not change a `vllm serve` started from it: only an
    # inferq engine hands the window over.
    words, log = probe({"INFERQ_ENGINE_SPIN_MS": "7"})
    assert words == ["1", "0.5", "0", "-"], log


def test_the_plugin_is_registered_with_vllm() -> None:
    found = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "inferq.worker.vllm_spin:apply" in found


@pytest.mark.parametrize("before", [None, "0.5"])
def test_only_the_engine_processes_inherit_the_window(monkeypatch: pytest.MonkeyPatch, before: str | None) -> None:
    # The bench starts direct's engine (vLLM as shipped: no window) and then inferq's local worker from one
    # process: what one engine was given must not leak into what the process starts later.
    if before is None:
        monkeypatch.delenv(vllm_spin.HANDOFF, raising=False)
    else:
        monkeypatch.setenv(vllm_spin.HANDOFF, before)
    monkeypatch.setattr(vllm_spin, "apply", lambda: None)  # this test process keeps vLLM's class as it is
    with vllm_spin.spin_for_children(0.002):
        assert os.environ[vllm_spin.HANDOFF] == "0.002"
    assert os.environ.get(vllm_spin.HANDOFF) == before
    with vllm_spin.spin_for_children(None):
        assert vllm_spin.HANDOFF not in os.environ
    assert os.environ.get(vllm_spin.HANDOFF) == before

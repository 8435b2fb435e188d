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

from shared.settings import load_settings
from worker import vllm_spin

ROOT = Path(__file__).resolve().parent.parent

# The reader side of one of vLLM's shared-memory queues, built as vLLM builds it (keywords only), and one
# built with an explicit window; prints both windows.
PROBE = """
import logging
import zmq
logging.basicConfig(level=logging.INFO)  # vLLM's own logging is set up with its engine, not on import
from worker import vllm_spin
vllm_spin.apply()
vllm_spin.apply()  # vLLM may load plugins more than once in a process: still one wrapper
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
ctx = zmq.Context()
plain = SpinCondition(is_reader=True, context=ctx, notify_address="inproc://inferq-spin-a")
chosen = SpinCondition(is_reader=True, context=ctx, notify_address="inproc://inferq-spin-b", busy_loop_s=0.5)
init, wrappers = SpinCondition.__init__, 0
while hasattr(init, "__wrapped__"):
    init, wrappers = init.__wrapped__, wrappers + 1
print(plain.busy_loop_s, chosen.busy_loop_s, wrappers)
"""


def probe(value: str | None) -> tuple[list[str], str]:
    env = {k: v for k, v in os.environ.items() if k != vllm_spin.ENV}
    if value is not None:
        env[vllm_spin.ENV] = value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return out.stdout.split(), out.stderr


def test_the_window_is_set_in_milliseconds_and_an_explicit_one_is_kept() -> None:
    words, log = probe("2.5")
    assert words == ["0.0025", "0.5", "1"], log  # applied twice, vLLM's __init__ is wrapped once
    assert "busy-waits 2.5 ms" in log


@pytest.mark.parametrize("value", [None, "", "fast", "-1", "nan"])
def test_without_a_valid_value_vllm_spins_as_it_ships(value: str | None) -> None:
    words, log = probe(value)
    assert words == ["1", "0.5", "0"], log  # vLLM's own default window is 1 s, its class untouched
    if value not in (None, ""):
        assert f"{vllm_spin.ENV}={value!r} is not a number" in log


def test_the_plugin_is_registered_with_vllm() -> None:
    found = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "worker.vllm_spin:apply" in found


def test_the_setting_and_the_plugin_use_one_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vllm_spin.ENV, "7")
    assert load_settings().engine_spin_ms == 7.0
    env: dict[str, str] = {}
    vllm_spin.export(env, load_settings().engine_spin_ms)
    assert env == {vllm_spin.ENV: "7"}
    vllm_spin.export(env, None)
    assert env == {}


@pytest.mark.parametrize("before", [None, "7"])
def test_only_the_engine_processes_inherit_the_window(monkeypatch: pytest.MonkeyPatch, before: str | None) -> None:
    # The bench starts direct's engine (vLLM as shipped: no variable) and then inferq's local worker from one
    # process: what the first engine was given must not leak into the second.
    if before is None:
        monkeypatch.delenv(vllm_spin.ENV, raising=False)
    else:
        monkeypatch.setenv(vllm_spin.ENV, before)
    with vllm_spin.spin_for_children(2.0):
        assert os.environ[vllm_spin.ENV] == "2"
    assert os.environ.get(vllm_spin.ENV) == before
    with vllm_spin.spin_for_children(None):
        assert vllm_spin.ENV not in os.environ
    assert os.environ.get(vllm_spin.ENV) == before

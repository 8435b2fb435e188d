"""On CPU, the model runs inside vLLM's engine core process (INFERQ_ENGINE_MODEL_IN_CORE).

vLLM 0.32's CPU platform always uses its multiprocess executor, one model process even for a single
worker: each step the engine core schedules, hands the batch to the model process over shared memory and
waits for its output. Every step then costs two process hand-offs, each a busy-wait or a wake-up
(worker/vllm_spin.py), and on a 2-core box the two engine processes share the cores with the worker's
front end, Redis and the clients. vLLM does it so because the model's OpenMP threads (their number and
the CPUs they are bound to) must be set in the environment before the process that runs the model loads
torch, and it sets them when it spawns the model process.

The engine core is itself a process vLLM spawns, and it loads torch afresh. So the worker asks for vLLM's
uniprocess executor, which runs the model in the core, and spawns the core with the OpenMP environment
vLLM's own OMPProcessManager would give the model process (rank 0): the same threads on the same CPUs,
without the hand-off. On the 2-core box this took inferq from 0.85 of direct vLLM to about parity at
concurrency 64 and 128, and to parity or above at concurrency 1 (docs/benchmark-history.md, "The model in the engine
core").

Where it does not apply (a GPU, where one worker already runs in the core; more than one model worker) or
this vLLM lacks what it needs, vLLM starts as it ships.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("inferq.engine")


@contextlib.contextmanager
def model_in_core(config: Any) -> Iterator[bool]:
    """While this is open, an AsyncLLM built from `config` (a VllmConfig, changed here) runs its model in its
    engine core; yields whether it will. Build the AsyncLLM inside: the core inherits the environment."""
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

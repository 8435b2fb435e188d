"""The engine's load as vLLM reports it: KV-cache use, running/waiting counts, preemptions (for worker.flow).

vLLM hands per-step scheduler stats to custom stat loggers (its public StatLoggerBase). Passing one turns stats
on without vLLM's own log lines; vLLM adds its Prometheus logger beside it (worker/engine_profile.py says when
it is kept quiet).
`record` runs on the worker's event loop (AsyncLLM's output handler), so plain attributes need no locks.
"""

from __future__ import annotations

from typing import Any

from inferq.worker.flow import EngineLoad


class LoadState:
    def __init__(self) -> None:
        self.kv_cache_usage = 0.0
        self.running = 0
        self.waiting = 0
        self.preemptions = 0  # since start; vLLM reports one when the preempted request runs again
        self.steps = 0

    def snapshot(self) -> EngineLoad | None:
        if not self.steps:
            return None
        return EngineLoad(self.kv_cache_usage, self.preemptions, self.running, self.waiting)


def stat_loggers(state: LoadState, *extra: Any) -> list[Any]:
    """Factories for AsyncLLM(stat_loggers=...): one that feeds `state`, then `extra`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            if scheduler_stats is not None:
                state.kv_cache_usage = scheduler_stats.kv_cache_usage
                state.running = scheduler_stats.num_running_reqs
                state.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                state.steps += 1
            if iteration_stats is not None:
                state.preemptions += iteration_stats.num_preempted_reqs

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return [LoadLogger, *extra]

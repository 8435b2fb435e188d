"""How a worker sets vLLM up: one switch, INFERQ_ENGINE_PROFILE (README, "Running a fleet").

- `vllm`: vLLM as it ships. No eager mode forced (CUDA graphs and torch.compile on), vLLM's stats logging and
  its Prometheus metrics on, its own processes and busy-waiting. What a GPU worker wants.
- `cpu-shared`: the tuning for a CPU box whose cores the engine shares with the worker, Redis and clients
  (measured on 2-core machines, docs/benchmark-history.md): eager mode (no compile at start), vLLM's stats off
  (its metrics only where the worker serves them), the model in the engine core, a short busy-wait window
  (INFERQ_ENGINE_SPIN_MS), the worker's session at INFERQ_WORKER_NICE, vLLM's settings cached. The parts that
  reach into vLLM's internals (worker/vllm_private.py) turn themselves off on a vLLM they were not tested on.
- `auto` (default): `cpu-shared` on a CPU, `vllm` anywhere else.

Both take the worker's own defaults (max_num_seqs from INFERQ_MAX_INFLIGHT, the served model name, and on CPU
float32 and a fixed KV cache), and INFERQ_ENGINE_ARGS / `--engine-arg` over everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferq.shared.settings import Settings


@dataclass(frozen=True)
class EngineSetup:
    profile: str  # "vllm" or "cpu-shared": what `auto` resolved to
    args: dict[str, Any]  # AsyncEngineArgs keywords
    spin_s: float | None  # the busy-wait window handed to vLLM's engine processes; None: vLLM's own (1 s)
    model_in_core: bool  # CPU: the model runs in the engine core (worker/vllm_private.py)
    nice: int  # the session's scheduling-group nice value (worker/cpu_share.py); 0: left alone
    cache_envs: bool  # vLLM's VLLM_* settings cached in the front-end process while the engine runs
    quiet_vllm_metrics: bool  # vLLM builds no Prometheus series (nobody scrapes them)


def engine_setup(
    settings: Settings,
    model_path: str,
    *,
    on_cpu: bool,
    tested: Callable[[], bool],
    serves_metrics: bool,
    as_shipped: bool = False,
) -> EngineSetup:
    """The engine set-up `settings` ask for on this machine (`on_cpu`); `tested()` says whether this vLLM is the
    release the private tuning was tested on (asked only where the profile would use it). `as_shipped` (the
    bench's direct ceiling): the same engine arguments, but vLLM's own processes and busy-wait."""
    profile = settings.engine_profile  # one of the names Settings allows
    if profile == "auto":
        profile = "cpu-shared" if on_cpu else "vllm"
    args: dict[str, Any] = {
        "model": model_path,
        "served_model_name": settings.model,  # vLLM's metrics label (model_name) and logs name the queue's model
        "max_model_len": settings.max_model_len,
        "max_num_seqs": max(settings.max_inflight, 1),
    }
    if on_cpu:
        # "auto" means bf16 on the CPU build, whose AMX bf16 kernels died with SIGILL on our 2-core VMs; float32
        # works everywhere. A CPU's KV cache is a fixed size (a GPU sizes it from free memory); vLLM's
        # VLLM_CPU_KVCACHE_SPACE (whole GiB), if set, still overrides it.
        args["dtype"] = "float32" if settings.dtype == "auto" else settings.dtype
        args["kv_cache_memory_bytes"] = int(settings.kv_cache_gib * 2**30)
    elif settings.dtype != "auto":
        args["dtype"] = settings.dtype
    shared = profile == "cpu-shared"
    if shared:
        args["enforce_eager"] = True  # no torch.compile at start: tens of seconds of two cores
        args["disable_log_stats"] = True  # its log lines every 5 s (its metrics come with the worker's)
    args.update(settings.engine_args)
    tuned = shared and tested()
    private = tuned and not as_shipped
    return EngineSetup(
        profile=profile,
        args=args,
        spin_s=settings.engine_spin_ms / 1000 if private else None,
        model_in_core=private and settings.engine_model_in_core,
        nice=settings.worker_nice if shared else 0,
        cache_envs=tuned,
        quiet_vllm_metrics=tuned and not serves_metrics,
    )

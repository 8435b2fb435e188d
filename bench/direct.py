"""The ceiling for `inferq bench online --target direct`: the same requests on vLLM's AsyncLLM,
called in this process with the worker's own engine settings (worker.vllm_engine), no queue in between."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from inferq.bench.stats import Prompt, Timing
from inferq.shared.schemas import GenerationRequest
from inferq.shared.settings import Settings
from inferq.worker.vllm_engine import VllmEngine

Send = Callable[[Prompt, Timing], Awaitable[None]]


def server_flags(settings: Settings) -> list[str]:
    """vLLM command-line flags (its OpenAI server, run-batch) for the engine arguments inferq's profile sets
    on this machine: float32 and eager mode on a CPU (INFERQ_ENGINE_PROFILE auto or cpu-shared), nothing on a GPU,
    where vLLM runs as it ships. The other targets of a bench then run the same engine as inferq's."""
    from vllm.platforms import current_platform

    from inferq.worker import vllm_private
    from inferq.worker.engine_profile import engine_setup

    args = engine_setup(
        settings, "", on_cpu=current_platform.is_cpu(), tested=vllm_private.tested, serves_metrics=False
    ).args
    flags = ["--dtype", str(args["dtype"])] if "dtype" in args else []
    return [*flags, "--enforce-eager"] if args.get("enforce_eager") else flags


@contextlib.asynccontextmanager
async def direct_sender(model_path: str, settings: Settings, *, as_shipped: bool = True) -> AsyncIterator[Send]:
    """The ceiling is vLLM as it ships; `as_shipped=False` sets it up as the worker does (benchmarks/engine_setup.py
    sets the two side by side)."""
    engine = VllmEngine(model_path, settings, as_shipped=as_shipped)
    await engine.start()
    ids = itertools.count()

    async def send(prompt: Prompt, timing: Timing) -> None:
        request = GenerationRequest(
            id=f"direct-{next(ids)}", model=settings.model, prompt=prompt.text, max_tokens=prompt.max_tokens,
            temperature=0,
        )  # fmt: skip
        async for delta in engine.generate(request):
            timing.token(time.perf_counter(), len(delta.token_ids))
        timing.done = time.perf_counter()

    try:
        yield send
    finally:
        await engine.stop()

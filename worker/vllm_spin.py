"""How long vLLM's engine processes busy-wait for each other before they sleep (INFERQ_ENGINE_SPIN_MS).

With the multiprocess executor (always on CPU; tensor parallel on GPUs) the engine core hands each step to
the model process, and each side waits for the other's shared-memory message. vLLM 0.32 waits by spinning
(`sched_yield`) for up to one second after the last message, hard-coded (`SpinCondition.busy_loop_s`), and
only then sleeps on a socket the writer pings. Under load a message comes every step, so both processes
spin from the first token to the last: on a 2-core box the engine core alone took 72% of a core doing
nothing, CPU the worker, Redis and the clients then had to take from the model (BENCHMARKS.md, "Engine
spin"). Upstream has pull requests to make the window configurable (vllm#51950, #52814); until one lands,
this vLLM *general plugin* sets it. vLLM loads general plugins in every one of its processes before it
builds these queues, so the spawned engine core and model process get it too.

The plugin acts only when INFERQ_ENGINE_SPIN_MS is in the environment: `worker.vllm_engine` puts it there
from the settings before it starts vLLM, and the bench does the same for vLLM's own servers so that every
target runs the same engine. Any other vLLM run in this environment is left as vLLM ships it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
from collections.abc import Iterator, MutableMapping
from typing import Any

# Under vLLM's "vllm" logger, which vLLM's engine processes print with their name in front.
log = logging.getLogger("vllm.inferq")

ENV = "INFERQ_ENGINE_SPIN_MS"


@contextlib.contextmanager
def spin_for_children(spin_ms: float | None) -> Iterator[None]:
    """While vLLM spawns its engine processes (they inherit this process's environment), the window in
    INFERQ_ENGINE_SPIN_MS; None: no variable (vLLM's own). The environment is put back afterwards, so nothing
    else this process starts later (the bench's other targets) inherits it."""
    before = os.environ.get(ENV)
    export(os.environ, spin_ms)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def export(env: MutableMapping[str, str], spin_ms: float | None) -> None:
    """Put the window into `env` for vLLM processes started with it; None removes it (vLLM's own)."""
    if spin_ms is None:
        env.pop(ENV, None)
    else:
        env[ENV] = f"{spin_ms:g}"


def apply() -> None:
    """The `vllm.general_plugins` entry point: set SpinCondition's busy-wait window from INFERQ_ENGINE_SPIN_MS."""
    raw = os.environ.get(ENV)
    if not raw:
        return
    try:
        seconds = float(raw) / 1000
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        log.warning("%s=%r is not a number of milliseconds >= 0; vLLM's engine spins as it ships", ENV, raw)
        return
    from vllm.distributed.device_communicators import shm_broadcast

    cls: Any = getattr(shm_broadcast, "SpinCondition", None)
    original = getattr(getattr(cls, "__init__", None), "__wrapped__", getattr(cls, "__init__", None))
    params = list(inspect.signature(original).parameters) if original is not None else []
    if "busy_loop_s" not in params:
        log.warning("this vLLM has no SpinCondition busy_loop_s; %s does nothing", ENV)
        return
    position = params.index("busy_loop_s") - 1  # among the arguments after self

    @functools.wraps(original)  # and so __wrapped__: applied again in one process, it wraps vLLM's own once
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) <= position:
            kwargs.setdefault("busy_loop_s", seconds)
        original(self, *args, **kwargs)

    cls.__init__ = __init__
    log.info("busy-waits %g ms for the next message before it sleeps (%s)", seconds * 1000, ENV)

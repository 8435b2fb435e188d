"""How long vLLM's engine processes busy-wait for each other before they sleep (INFERQ_ENGINE_SPIN_MS).

With the multiprocess executor (tensor parallel on GPUs; vLLM's choice on CPU, where inferq runs the model in
the engine core instead unless INFERQ_ENGINE_MODEL_IN_CORE is off: worker/vllm_private.py) the engine core
hands each step to the model process, and each side waits for the other's shared-memory message. vLLM 0.32 waits
by spinning (`sched_yield`) for up to one second after the last message, hard-coded
(`SpinCondition.busy_loop_s`), and only then sleeps on a socket the writer pings. Under load a message comes
every step, so both processes spin from the first token to the last: on a 2-core box the engine core alone took
72% of a core doing nothing, CPU the worker, Redis and the clients then had to take from the model
(docs/benchmark-history.md, "The engine's busy-wait"). Upstream has pull requests to make the window configurable
(vllm#51950, #52814); until one lands, this vLLM *general plugin* sets it. vLLM loads general plugins in every
one of its processes before it builds these queues, so the spawned engine core and model process get it too.

The plugin acts only when vLLM starts inside `spin_for_children` (as `worker.vllm_engine` starts it), which
hands it the window from the settings in a private environment variable. Any other vLLM run in this
environment (the bench's direct, OpenAI-server and run-batch targets among them, or a `vllm serve` from a
shell that exports INFERQ_ENGINE_SPIN_MS) is left as vLLM ships it. If VLLM_PLUGINS is set, vLLM loads only
the plugins it names: add `inferq_engine_spin` to it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator

from inferq.worker.vllm_children import handed_down
from inferq.worker.vllm_private import patch_busy_wait

# Under vLLM's "vllm" logger, which vLLM's engine processes print with their name in front.
log = logging.getLogger("vllm.inferq")

# The window in seconds, from the settings (INFERQ_ENGINE_SPIN_MS, validated there), set only while an inferq
# engine starts vLLM: a user's INFERQ_* environment never reaches a vLLM started any other way.
HANDOFF = "_INFERQ_ENGINE_BUSY_LOOP_S"


@contextlib.contextmanager
def spin_for_children(seconds: float | None) -> Iterator[None]:
    """While vLLM starts, its busy-wait window for the engine processes it spawns (they inherit this process's
    environment and load the plugin) or forks (they inherit this process's classes, patched here too);
    None: vLLM's own. The environment is put back afterwards, so nothing this process starts later (the
    bench's other targets) inherits the window. This process's own class stays patched: it holds no
    such reader."""
    with handed_down(HANDOFF, None if seconds is None else repr(seconds)):
        if seconds is not None:
            apply()
        yield


def apply() -> None:
    """The `vllm.general_plugins` entry point: vLLM's busy-wait window from the hand-off variable, if set."""
    raw = os.environ.get(HANDOFF)
    if not raw:
        return
    try:
        seconds = float(raw)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError("not a number of seconds >= 0")
        patch_busy_wait(seconds)
    except Exception as exc:  # vLLM calls plugins unguarded: whatever this vLLM is, it must still start
        log.warning(
            "vLLM's busy-wait left as it ships: cannot apply %s=%r (%s: %s)", HANDOFF, raw, type(exc).__name__, exc
        )
        return
    log.info("busy-waits %g ms for the next message before it sleeps (INFERQ_ENGINE_SPIN_MS)", seconds * 1000)

"""The garbage collector of a long-running serving process (a worker, the gateway, a bulk runner), set once it
has started.

Two costs the defaults leave in a server's hot path:
- A full collection walks every object tracked, most of them made by starting (vLLM, torch and the model's
  objects: 600,000 of them on the tiny model) and alive until exit: 350 ms with the event loop stopped, each
  time enough of what serving allocates survives to set one off. Frozen after a collection, they are out of
  every pass. vLLM's own server does the same once it is up.
- The young generation is collected every 700 allocations of tracked objects (Python's default). A request in
  flight holds a few dozen (its task, futures, dicts, the request object), so with a few hundred in flight
  each young collection walks thousands of live objects and moves them on to older generations, whose passes
  then walk them again: ~8% of a stand-in worker's CPU at ~9,000 requests/s (py-spy, and its time in
  gc.callbacks). Collected every YOUNG_THRESHOLD allocations instead, most of what a request made has been
  freed by its reference count before a pass sees it. A pass then takes well under a millisecond.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("inferq.heap")

# Allocations of tracked objects between two collections of the young generation; the older generations keep
# their default ratios (every 10th young pass, then every 10th of those).
YOUNG_THRESHOLD = 20_000


def settle_heap(what: str) -> None:
    """Collect, freeze what is left out of later passes, and collect the young generation less often. Call once,
    after starting and before serving: the collection stops everything a moment."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    log.info(
        "%s heap frozen: %d objects out of the garbage collector's passes (a full pass took %.0f ms); the young "
        "generation is collected every %d allocations",
        what, gc.get_freeze_count(), 1000 * (time.perf_counter() - started), YOUNG_THRESHOLD,
    )  # fmt: skip

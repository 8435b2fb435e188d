"""The command line's terminal display and the calls behind each command: text as it streams, one-line
summaries, `inferq status`, the bulk progress bar, dead letters. It belongs to `inferq.cli`; the client
library never imports it.

Submodules load on first use (`console.bulk.run_bulk(...)` imports `console.bulk` then): each command pays
only for the libraries it calls, and vLLM's spawned processes, which import the command line again, for none.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inferq.console import bulk, dead_letters, local, requests, serve, status

__all__ = ["bulk", "dead_letters", "local", "requests", "serve", "status"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")

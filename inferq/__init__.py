"""inferq: queue-driven LLM inference on Redis Streams and vLLM.

The public API is the client library: `from inferq import InferenceClient, SyncInferenceClient`. The names are
loaded on first use, so importing `inferq` alone costs nothing: vLLM imports `inferq.worker.vllm_spin` in each
of its processes (a plugin), and those must not pay for the client's imports.

Packages: `inferq.shared` (the contracts both sides agree on), `inferq.producer` (the client library and bulk
jobs), `inferq.worker` (the consumer loop and the engine adapters), `inferq.console` (the command line's
terminal display), `inferq.cli` (the command line), `inferq.bench` (the benchmark harness; its dependencies
come with the `bench` extra). See docs/CONTRACTS.md for what crosses a process boundary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inferq.producer.client import InferenceClient, RequestHandle
    from inferq.producer.sync import SyncInferenceClient
    from inferq.shared.errors import InferqError

__all__ = ["InferenceClient", "InferqError", "RequestHandle", "SyncInferenceClient"]

_HOMES = {
    "InferenceClient": "inferq.producer.client",
    "RequestHandle": "inferq.producer.client",
    "SyncInferenceClient": "inferq.producer.sync",
    "InferqError": "inferq.shared.errors",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'inferq' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

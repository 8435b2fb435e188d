"""What the worker needs from an engine: start, stop, and a stream of per-step deltas for one request."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Protocol

from inferq.shared.errors import InferqError
from inferq.shared.schemas import GenerationRequest
from inferq.worker.flow import EngineLoad


@dataclass(slots=True)
class Delta:
    """One request's share of one engine step (vLLM's DELTA output kind)."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0


class RequestRejected(InferqError):
    """The engine refuses this request for good (too long for the context, bad parameters): no retry."""


class Engine(Protocol):
    """An async engine: many `generate` calls run at once and are batched by the engine itself.

    Cancelling the task iterating `generate`, or closing the generator, aborts the request in the engine. An
    engine that died raises `shared.errors.EngineError` from `generate`; the worker then stops and leaves its
    work pending."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]: ...

    def load(self) -> EngineLoad | None:
        """The engine's latest KV-cache use and preemption count, or None if it does not report them."""
        ...

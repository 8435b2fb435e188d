"""A deterministic stand-in engine for tests and benchmarks of the queue's own logic.

It is not vLLM and never pretends to be: it emits `max_tokens` tokens at a fixed rate, one per step, for
every request at once (like a continuously batched engine), so what a test or benchmark measures is the
Redis layer. Token i of a request is the text "t{i} " with token id i. For error-path tests, the prompt
"fail" is refused (RequestRejected), the prompt "crash" raises an unexpected error for that request only,
the prompt "die" fails the whole engine (EngineError), as a crashed vLLM engine core would, and the prompt
"hang" never yields a token, as a hung engine would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from inferq.shared.errors import EngineError
from inferq.shared.schemas import GenerationRequest
from inferq.worker.engine import Delta, RequestRejected


class StandInEngine:
    def __init__(self, step_s: float = 0.001) -> None:
        self.name = "standin"
        self.step_s = step_s

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def load(self) -> None:
        return None  # no KV cache: the stand-in never runs out of room

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        if request.prompt == "fail":
            raise RequestRejected("stand-in engine refuses the prompt 'fail'")
        if request.prompt == "crash":
            raise RuntimeError("stand-in engine crashed on the prompt 'crash'")
        if request.prompt == "die":
            raise EngineError("stand-in engine died on the prompt 'die'")
        if request.prompt == "hang":
            await asyncio.Event().wait()  # until cancelled
        prompt_tokens = len((request.prompt or "".join(m.content for m in request.messages or [])).split())
        for i in range(request.max_tokens):
            await asyncio.sleep(self.step_s)  # 0 still lets the loop run the others between tokens
            last = i == request.max_tokens - 1
            yield Delta(f"t{i} ", [i], last, "length" if last else None, prompt_tokens)

"""`inferq submit`, `result` and `cancel` at the terminal: the text to stdout as it comes, a line of stats to
stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

from inferq.producer.client import InferenceClient
from inferq.shared.schemas import Result
from inferq.shared.settings import Settings


def chat(prompt: str, system: str | None, raw: bool) -> dict[str, Any]:
    """The request's input as the command line gives it: `prompt` as the user message after an optional system
    message, or with `raw` the prompt as it is, without the chat template."""
    if raw:
        return {"prompt": prompt, "messages": None}
    system_message = [{"role": "system", "content": system}] if system else []
    return {"prompt": None, "messages": [*system_message, {"role": "user", "content": prompt}]}


async def submit_and_print(
    settings: Settings, request: dict[str, Any], *, stream: bool, as_json: bool, timeout: float
) -> Result:
    """Submit one request; with `stream`, write its text to stdout as it comes; with `as_json`, the final result
    as one JSON object instead. Returns the stored result."""
    stream = stream and not as_json
    async with InferenceClient(settings) as client:
        handle = await client.submit(stream=stream, **request)
        print(f"request {handle.id} queued", file=sys.stderr, flush=True)
        printed = ""
        if stream:
            async for event in handle.tokens(timeout=timeout):
                sys.stdout.write(event.text)
                sys.stdout.flush()
                printed += event.text
        result = await handle.result(timeout=timeout)
    if stream:
        # If events were missed (a reconnect), finish the line from the stored text.
        rest = result.text[len(printed) :] if result.text.startswith(printed) else "\n" + result.text
        sys.stdout.write(rest + "\n")
        sys.stdout.flush()
    print(describe(result), file=sys.stderr, flush=True)
    if as_json:
        print(json.dumps(result.model_dump(mode="json")))
    return result


async def print_result(settings: Settings, request_id: str, *, as_json: bool) -> None:
    """`inferq result`: the status (and error) to stderr and the text to stdout, or the whole record as JSON."""
    async with InferenceClient(settings) as client:
        stored = await client.get(request_id)
    if as_json:
        print(json.dumps(stored.model_dump(mode="json")))
        return
    print(f"status: {stored.status}", file=sys.stderr)
    if stored.error:
        print(f"error: {stored.error}", file=sys.stderr)
    print(stored.text)


def describe(result: Result) -> str:
    """One line of stats: status, tokens, time to first token, decode speed."""
    t = result.timings
    parts = [f"[{result.status}", f"finish={result.finish_reason}"]
    parts.append(f"tokens in/out {result.usage.prompt_tokens}/{result.usage.completion_tokens}")
    if t.queued_at and t.first_token_at:
        parts.append(f"ttft {1000 * (t.first_token_at - t.queued_at):.0f} ms")
    if t.first_token_at and t.finished_at and result.usage.completion_tokens > 1:
        span = max(t.finished_at - t.first_token_at, 1e-6)
        parts.append(f"{(result.usage.completion_tokens - 1) / span:.1f} tok/s")
    if result.error:
        parts.append(f"error: {result.error}")
    return ", ".join(parts) + "]"


async def cancel_request(settings: Settings, request_id: str) -> str:
    async with InferenceClient(settings) as client:
        return await client.cancel(request_id)

"""The gateway's routes (aiohttp): OpenAI's chat and completions, whole or streamed as Server-Sent Events,
the models that have live workers, and health. Each request is a queue request of the caller's tenant,
with an id the gateway makes; a caller that goes away cancels its request."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from inferq.gateway import batches, openai_api, websocket
from inferq.gateway.callers import ApiKeys
from inferq.gateway.context import CALLER, GATEWAY, Gateway, read_json
from inferq.gateway.errors import HttpError, openai_errors
from inferq.gateway.metrics import GatewayMetrics
from inferq.gateway.openai_api import Ask
from inferq.producer import RequestHandle
from inferq.shared.connection import OUTAGE
from inferq.shared.schemas import Result
from inferq.shared.settings import Settings

log = logging.getLogger("inferq.gateway")
_MAX_IDEMPOTENCY_KEY = 255


def build_app(settings: Settings) -> web.Application:
    gateway = Gateway(settings, ApiKeys.from_settings(settings))
    metrics = GatewayMetrics()
    # Outermost first: measure what the caller got (after errors became OpenAI bodies), then errors, then keys.
    middlewares = [metrics.middleware(), openai_errors, authenticate]
    app = web.Application(client_max_size=settings.gateway_max_body_bytes, middlewares=middlewares)
    app[GATEWAY] = gateway

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        async with gateway:
            yield

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/requests/{request_id}", read_request)
    app.router.add_post("/v1/requests/{request_id}/cancel", cancel_request)
    app.router.add_post("/v1/files", batches.upload_file)
    app.router.add_get("/v1/files", batches.list_files)
    app.router.add_get("/v1/files/{file_id}", batches.read_file)
    app.router.add_get("/v1/files/{file_id}/content", batches.file_content)
    app.router.add_delete("/v1/files/{file_id}", batches.delete_file)
    app.router.add_post("/v1/batches", batches.create_batch)
    app.router.add_get("/v1/batches", batches.list_batches)
    app.router.add_get("/v1/batches/{batch_id}", batches.read_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", batches.cancel_batch)
    app.router.add_get("/ws/generate", ws_generate)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics.serve)
    return app


async def ws_generate(request: web.Request) -> web.WebSocketResponse:
    return await websocket.ws_generate(request, request.app[GATEWAY], request[CALLER])


@web.middleware
async def authenticate(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith(("/v1/", "/ws/")):
        request[CALLER] = request.app[GATEWAY].api_keys.caller(request.headers.get("Authorization"))
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    """Ready only when Redis answers."""
    try:
        await request.app[GATEWAY].client.redis.ping()
    except OUTAGE:
        return web.json_response({"status": "redis unreachable"}, status=503)
    return web.json_response({"status": "ok"})


async def list_models(request: web.Request) -> web.Response:
    models = await request.app[GATEWAY].live_models(request[CALLER])
    data = [{"id": m, "object": "model", "created": t, "owned_by": "inferq"} for m, t in models.items()]
    return web.json_response({"object": "list", "data": data})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    gateway, caller = request.app[GATEWAY], request[CALLER]
    ask = openai_api.parse(await read_json(request), chat=chat)
    await gateway.require_model(caller, ask.model)
    idempotency_key = request.headers.get("Idempotency-Key")
    if idempotency_key is not None and not 0 < len(idempotency_key) <= _MAX_IDEMPOTENCY_KEY:
        raise HttpError(400, f"Idempotency-Key must be 1 to {_MAX_IDEMPOTENCY_KEY} characters", "invalid_header")
    request_id = caller.request_id(openai_api.kind(ask), idempotency_key)
    later = "respond-async" in request.headers.get("Prefer", "")
    handle = await gateway.client.submit(
        model=ask.model, request_id=request_id, tenant=caller.tenant, stream=ask.stream and not later, **ask.submit
    )
    if later:  # enqueue and poll: the caller reads GET /v1/requests/{id} when it likes
        location = f"/v1/requests/{handle.id}"
        return web.json_response(_state(handle.id, ask.model, "queued"), status=202, headers={"Location": location})
    ended = False
    try:
        if ask.stream:
            response = await _stream(request, ask, handle)
        else:
            result = await handle.result(timeout=gateway.settings.request_timeout_s)
            body = openai_api.completion(ask, handle.id, _done(result))
            response = web.json_response(body, headers={"X-Request-Id": handle.id})
        ended = True
        return response
    finally:
        if not ended:  # the caller left, timed out, or the stream broke: nobody will read the rest
            gateway.cancel_soon(handle.id)


async def read_request(request: web.Request) -> web.Response:
    """GET /v1/requests/{id}: a request's state, and its answer (or how it ended) once it has ended."""
    gateway, request_id = request.app[GATEWAY], request.match_info["request_id"]
    ask = _own_request(request, request_id)
    result = await gateway.client.get(request_id)
    ask.model = result.model or ask.model
    state = _state(request_id, ask.model, result.status, int(result.timings.queued_at or 0))
    if result.status == "done":
        state["response"] = openai_api.completion(ask, request_id, result)
    elif result.final:
        state["error"] = _ended_badly(result).body()["error"]
    return web.json_response(state)


async def cancel_request(request: web.Request) -> web.Response:
    """POST /v1/requests/{id}/cancel: a queued request ends at once, a running one is aborted in the engine."""
    request_id = request.match_info["request_id"]
    ask = _own_request(request, request_id)
    status = await request.app[GATEWAY].client.cancel(request_id)
    return web.json_response(_state(request_id, ask.model, status))


def _own_request(request: web.Request, request_id: str) -> Ask:
    """The caller's own gateway request (what it asked for, as far as its id tells), or 404: another key's
    requests do not exist for it."""
    ask = openai_api.ask_of(request_id) if request[CALLER].owns(request_id) else None
    if ask is None:
        raise HttpError(404, f"no request {request_id!r} of this API key", "not_found")
    return ask


def _state(request_id: str, model: str, status: str, created: int | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "inferq.request", "model": model, "status": status,
            "created": created or int(time.time())}  # fmt: skip


def _done(result: Result) -> Result:
    """`result` if it ended `done`, else the HttpError that says how it ended."""
    if result.status == "done":
        return result
    raise _ended_badly(result)


def _ended_badly(result: Result) -> HttpError:
    error = result.error or ""
    if result.status == "expired":
        return HttpError(504, "the request reached its deadline before it finished", "deadline_exceeded")
    if result.status == "cancelled":
        return HttpError(409, "the request was cancelled", "cancelled")
    if error.startswith(("refused: ", "rejected by the engine: ")):  # what it asked for: the caller's to fix
        return HttpError(400, error.partition(": ")[2], "context_length_exceeded" if "context" in error else None)
    return HttpError(500, f"the request failed: {error}", "request_failed")


async def _stream(request: web.Request, ask: Ask, handle: RequestHandle) -> web.StreamResponse:
    """Server-Sent Events in OpenAI's chunk format: the role first, text as it comes, the finish reason, the
    usage if asked for, then `data: [DONE]`. An error after the stream began is one `data: {"error": ...}`."""
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": handle.id}
    response = web.StreamResponse(headers=headers)  # sent at once: the caller knows its id before any token
    await response.prepare(request)
    created, timeout = int(time.time()), request.app[GATEWAY].settings.request_timeout_s
    sent, first = 0, True  # the role goes with the first text, as vLLM's server sends it: a client that times
    async for event in handle.tokens(timeout=timeout):  # its first token by the first chunk is not misled
        if event.text:
            sent += len(event.text)
            await _send(response, openai_api.chunk(ask, handle.id, created, event.text, first=first))
            first = False
    result = await handle.result(timeout=timeout)  # the stored end: status, usage, and any text events missed
    if result.status == "done":
        if len(result.text) > sent or first:
            await _send(response, openai_api.chunk(ask, handle.id, created, result.text[sent:], first=first))
        await _send(response, openai_api.chunk(ask, handle.id, created, None, result.finish_reason or "stop"))
        if ask.include_usage:
            await _send(response, openai_api.usage_chunk(ask, handle.id, created, result))
    else:
        await _send(response, _ended_badly(result).body())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _send(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")

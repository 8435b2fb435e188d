"""The gateway's routes (aiohttp): OpenAI's chat and completions, whole or streamed as Server-Sent Events,
the models that have live workers, and health. Each request is a queue request of the caller's tenant,
with an id the gateway makes; a caller that goes away cancels its request."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from inferq.gateway import openai_api, websocket
from inferq.gateway.callers import ApiKeys, Caller
from inferq.gateway.errors import HttpError, openai_errors
from inferq.gateway.metrics import GatewayMetrics
from inferq.gateway.models import LiveModels
from inferq.gateway.openai_api import Ask
from inferq.producer import InferenceClient, RequestHandle
from inferq.shared.connection import OUTAGE
from inferq.shared.lifecycle import AsyncLifecycle
from inferq.shared.schemas import Result
from inferq.shared.settings import Settings

log = logging.getLogger("inferq.gateway")
CALLER = "inferq.caller"  # the request's Caller, set by `authenticate`
_MAX_IDEMPOTENCY_KEY = 255


class Gateway(AsyncLifecycle):
    """What every route shares: the client it enqueues through, the API keys, the live models."""

    def __init__(self, settings: Settings, api_keys: ApiKeys) -> None:
        self.settings = settings
        self.api_keys = api_keys
        self.client = InferenceClient(settings, tenant_caps=api_keys.tenant_caps())
        self.models: LiveModels | None = None
        self._cancels: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        await self.client.start()
        self.models = LiveModels(self.client.redis, self.client.keys)

    async def close(self) -> None:
        if self._cancels:
            await asyncio.wait(self._cancels, timeout=5)
        await self.client.close()

    async def live_models(self, caller: Caller) -> dict[str, int]:
        assert self.models is not None
        return {m: t for m, t in (await self.models.current()).items() if caller.may_use(m)}

    async def require_model(self, caller: Caller, model: str) -> None:
        if not caller.may_use(model):
            raise HttpError(404, f"model {model!r} does not exist or this API key may not use it", "model_not_found")
        if model not in await self.live_models(caller):
            raise HttpError(
                404, f"no worker serves model {model!r} now; GET /v1/models lists those that do", "model_not_found",
                param="model",
            )  # fmt: skip

    def cancel_soon(self, request_id: str) -> None:
        """The caller went away: cancel its request (in the background: the handler is being cancelled)."""
        task = asyncio.create_task(self._cancel(request_id), name="inferq-gateway-cancel")
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, request_id: str) -> None:
        try:
            await self.client.cancel(request_id)
        except Exception as exc:  # the request ends anyway; it runs to its end unread
            log.warning("could not cancel %s after its caller left: %s", request_id, exc)


GATEWAY = web.AppKey("gateway", Gateway)


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
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise HttpError(400, f"the request body is not JSON ({exc.msg} at line {exc.lineno})") from None
    ask = openai_api.parse(body, chat=chat)
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
            response = web.json_response(openai_api.completion(ask, handle.id, _done(result)))
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
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    created, timeout = int(time.time()), request.app[GATEWAY].settings.request_timeout_s
    await _send(response, openai_api.chunk(ask, handle.id, created, "", first=True))
    sent = 0
    async for event in handle.tokens(timeout=timeout):
        if event.text:
            sent += len(event.text)
            await _send(response, openai_api.chunk(ask, handle.id, created, event.text))
    result = await handle.result(timeout=timeout)  # the stored end: status, usage, and any text events missed
    if result.status == "done":
        if len(result.text) > sent:
            await _send(response, openai_api.chunk(ask, handle.id, created, result.text[sent:]))
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

"""`/ws/generate`: one WebSocket carries many requests at once (docs/CONTRACTS.md, "Gateway").

The caller sends JSON messages, each tagged with an id of its own choosing:
  {"type": "generate", "id": "q1", "model": "smollm2", "messages": [...] or "prompt": "...", ...}
    (the parameters of /v1/chat/completions or /v1/completions)
  {"type": "cancel", "id": "q1"}
and gets back, tagged the same way, the text as it comes and one end per request:
  {"type": "token", "id": "q1", "text": "..."}
  {"type": "done", "id": "q1", "status": "done", "text": "...", "finish_reason": "stop", "usage": {...}}
  {"type": "error", "id": "q1", "error": {"message", "type", "param", "code"}}
A socket that closes cancels every request it still has running.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import WSMsgType, web

from inferq.gateway import openai_api
from inferq.gateway.callers import Caller
from inferq.gateway.context import Gateway
from inferq.gateway.errors import HttpError, from_inferq
from inferq.shared.errors import InferqError

log = logging.getLogger("inferq.gateway")
_MAX_TAG = 200
_HEARTBEAT_S = 30.0


class Session:
    """One socket: its requests by the caller's tags, and one writer at a time."""

    def __init__(self, gateway: Gateway, caller: Caller, ws: web.WebSocketResponse) -> None:
        self.gateway, self.caller, self.ws = gateway, caller, ws
        self.running: dict[str, asyncio.Task[None]] = {}
        self.request_ids: dict[str, str] = {}  # tag -> queue request id, once submitted
        self.cancelled: set[str] = set()  # tags the caller cancelled
        self._writing = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._writing:
            if not self.ws.closed:
                await self.ws.send_str(json.dumps(message, separators=(",", ":")))

    async def on_text(self, data: str) -> None:
        try:
            message = json.loads(data)
        except json.JSONDecodeError as exc:
            return await self._refuse(None, HttpError(400, f"a message is not JSON ({exc.msg})"))
        if not isinstance(message, dict):
            return await self._refuse(None, HttpError(400, "a message is a JSON object with type and id"))
        tag, kind = message.pop("id", None), message.pop("type", None)
        if not isinstance(tag, str) or not 0 < len(tag) <= _MAX_TAG:
            return await self._refuse(None, HttpError(400, f"each message needs an id: a string of 1 to {_MAX_TAG}"))
        if kind == "generate":
            if tag in self.running:
                return await self._refuse(tag, HttpError(400, f"id {tag!r} is running on this socket already"))
            task = asyncio.create_task(self._generate(tag, message), name=f"inferq-ws-{tag}")
            self.running[tag] = task
            task.add_done_callback(lambda _t: self._forget(tag))
        elif kind == "cancel":
            if tag not in self.running:
                return await self._refuse(tag, HttpError(404, f"no request {tag!r} runs on this socket"))
            self.cancelled.add(tag)
            request_id = self.request_ids.get(tag)
            if request_id is not None:  # else: cancelled as soon as it is submitted
                await self.gateway.client.cancel(request_id)  # its stream ends with status `cancelled`
        else:
            await self._refuse(tag, HttpError(400, "type must be generate or cancel"))

    def _forget(self, tag: str) -> None:
        self.running.pop(tag, None)
        self.request_ids.pop(tag, None)
        self.cancelled.discard(tag)

    async def _generate(self, tag: str, body: dict[str, Any]) -> None:
        try:
            ask = openai_api.parse(body, chat="messages" in body)
            await self.gateway.require_model(self.caller, ask.model)
            handle = await self.gateway.client.submit(
                model=ask.model, request_id=self.caller.request_id(openai_api.kind(ask)), tenant=self.caller.tenant,
                stream=True, **ask.submit,
            )  # fmt: skip
            self.request_ids[tag] = handle.id
            if tag in self.cancelled:  # cancelled while it was being submitted
                await self.gateway.client.cancel(handle.id)
            timeout = self.gateway.settings.request_timeout_s
            async for event in handle.tokens(timeout=timeout):
                if event.text:
                    await self.send({"type": "token", "id": tag, "text": event.text})
            result = await handle.result(timeout=timeout)
            usage = openai_api.usage(result)
            await self.send({"type": "done", "id": tag, "status": result.status, "text": result.text,
                             "finish_reason": result.finish_reason, "usage": usage, "error": result.error})  # fmt: skip
        except HttpError as exc:
            await self._refuse(tag, exc)
        except InferqError as exc:
            await self._refuse(tag, from_inferq(exc))

    async def _refuse(self, tag: str | None, error: HttpError) -> None:
        await self.send({"type": "error", "id": tag, "error": error.body()["error"]})

    async def close(self) -> None:
        """The socket is gone: cancel what still runs, here and in the queue."""
        for tag, task in list(self.running.items()):
            request_id = self.request_ids.get(tag)
            task.cancel()
            if request_id is not None:
                self.gateway.cancel_soon(request_id)
        await asyncio.gather(*self.running.values(), return_exceptions=True)


async def ws_generate(request: web.Request, gateway: Gateway, caller: Caller) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=_HEARTBEAT_S, max_msg_size=gateway.settings.gateway_max_body_bytes)
    await ws.prepare(request)
    session = Session(gateway, caller, ws)
    try:
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await session.on_text(message.data)
            elif message.type == WSMsgType.ERROR:
                log.warning("websocket closed with an error: %s", ws.exception())
    finally:
        await session.close()
    return ws

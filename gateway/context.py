"""What every route shares: the `Gateway` (the client it enqueues through, its API keys, the live models, the
Batch API's files), found as `request.app[GATEWAY]`, and the request's `Caller` (`request[CALLER]`)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from inferq.gateway.callers import ApiKeys, Caller
from inferq.gateway.errors import HttpError
from inferq.gateway.files import Files
from inferq.gateway.models import LiveModels
from inferq.producer import InferenceClient
from inferq.shared.lifecycle import AsyncLifecycle
from inferq.shared.settings import Settings

log = logging.getLogger("inferq.gateway")
CALLER = "inferq.caller"  # the request's Caller, set by app.authenticate


class Gateway(AsyncLifecycle):
    """What every route shares: the client it enqueues through, the API keys, the live models."""

    def __init__(self, settings: Settings, api_keys: ApiKeys) -> None:
        self.settings = settings
        self.api_keys = api_keys
        self.client = InferenceClient(settings, tenant_caps=api_keys.tenant_caps())
        self.models: LiveModels | None = None
        self.files: Files | None = None
        self._cancels: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        await self.client.start()
        self.models = LiveModels(self.client.redis, self.client.keys)
        self.files = Files(self.client.redis, self.client.keys, self.settings)

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


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; a 400 that says where it breaks if it is not JSON."""
    try:
        return await request.json()
    except json.JSONDecodeError as exc:
        raise HttpError(400, f"the request body is not JSON ({exc.msg} at line {exc.lineno})") from None

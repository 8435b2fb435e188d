"""Every error as OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`), with the status an
OpenAI client library acts on: 400 invalid, 401 key, 404 model, 413 body too large, 429 queue full (with
Retry-After), 503 Redis unreachable, 504 past the deadline (docs/CONTRACTS.md, "Gateway")."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

from aiohttp import web
from redis.exceptions import RedisError

from inferq.shared.connection import as_inferq_error
from inferq.shared.errors import (
    InferqError,
    InvalidRequest,
    PermissionDenied,
    QueueFull,
    RedisUnavailable,
    RequestNotFound,
    RequestTimeout,
)

log = logging.getLogger("inferq.gateway")

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 409: "invalid_request_error",
    413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout",
}  # fmt: skip


class HttpError(Exception):
    """An error the gateway answers with `status` and OpenAI's error body."""

    def __init__(
        self, status: int, message: str, code: str | None = None, *, param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def from_inferq(exc: InferqError) -> HttpError:
    """The HTTP face of an error the producer library raised."""
    if isinstance(exc, QueueFull):
        wait = max(1, math.ceil(exc.retry_after_s))
        return HttpError(429, str(exc), "queue_full", headers={"Retry-After": str(wait)})
    if isinstance(exc, InvalidRequest):
        return HttpError(400, str(exc), "invalid_request")
    if isinstance(exc, RequestNotFound):
        return HttpError(404, str(exc), "not_found")
    if isinstance(exc, RedisUnavailable | PermissionDenied):  # the gateway's own Redis, not the caller's doing
        log.error("redis: %s", exc)
        return HttpError(503, "the queue is unavailable; try again shortly", "queue_unavailable")
    if isinstance(exc, RequestTimeout):
        return HttpError(504, str(exc), "timeout")
    return HttpError(500, str(exc), "internal_error")


@web.middleware
async def openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except HttpError as exc:
        return exc.response()
    except InferqError as exc:
        return from_inferq(exc).response()
    except RedisError as exc:  # met outside the client's own methods (the worker list, a health check)
        error = as_inferq_error(exc, f"serve {request.method} {request.path}")
        if error is None:
            raise
        return from_inferq(error).response()
    except web.HTTPRequestEntityTooLarge as exc:
        # aiohttp's text says both sizes: "Maximum request body size N exceeded, actual body size M".
        return HttpError(413, f"{exc.text} (INFERQ_GATEWAY_MAX_BODY_BYTES)", "body_too_large").response()
    except web.HTTPException as exc:  # aiohttp's own: unknown route (404), wrong method (405), ...
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}  # the body is ours: JSON
        return HttpError(exc.status, exc.reason, headers=headers).response()

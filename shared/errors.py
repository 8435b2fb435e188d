"""One exception hierarchy for everything inferq raises on purpose.

Catch `InferqError` to handle all of them; each subclass says what went wrong and, where a user can act,
what to do about it.
"""

from __future__ import annotations


class InferqError(Exception):
    """Root of every error inferq raises on purpose."""


class ConfigError(InferqError):
    """A setting or a command-line option is wrong; the message names it and the fix."""


class InvalidRequest(InferqError, ValueError):
    """A request failed validation before anything was enqueued."""


class QueueFull(InferqError):
    """Admission refused: the model's lane is at its cap (or its lag cap), or the tenant is at its cap.
    Retry after `retry_after_s` (estimated from the workers' recent drain rate), or submit with wait=True."""

    def __init__(
        self, model: str, queue_len: int, lag: int, retry_after_s: float, *, tenant: str | None = None, note: str = ""
    ) -> None:
        self.model = model
        self.queue_len = queue_len
        self.lag = lag
        self.retry_after_s = retry_after_s
        self.tenant = tenant
        what = (
            f"tenant {tenant!r} is at its cap of unfinished requests for model {model!r}"
            if tenant
            else f"queue for model {model!r} is full ({queue_len} queued{f', {lag} unread' if lag else ''})"
        )
        super().__init__(f"{what}; retry in ~{retry_after_s:.1f}s, submit with wait, or start more workers{note}")


class RequestTimeout(InferqError, TimeoutError):
    """Waiting for a result took longer than the caller allowed. The request itself may still finish."""


class RequestNotFound(InferqError, KeyError):
    """No stored result for this id: it never existed, or its result expired (see result_ttl_s)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "request not found"


class RequestFailed(InferqError):
    """The request ended `failed`, `cancelled` or `expired`; `.result` holds the stored record."""

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result


class BadPayload(InferqError):
    """A queue entry or event could not be decoded or validated (poison input)."""


class RedisUnavailable(InferqError, ConnectionError):
    """The Redis server cannot be reached or started."""


class ModelError(InferqError):
    """A model cannot be prepared or loaded."""


class EngineError(InferqError):
    """The inference engine failed; the worker leaves in-flight work pending for others."""


class WriteRefused(InferqError):
    """Redis refused a worker's write for one request (no permission on a key or channel, a key of the wrong
    type) after a few tries: that request ends `failed` with the reason; the worker and its other requests
    go on."""


class PermissionDenied(InferqError, PermissionError):
    """The Redis user may not do this (its ACL, docs/CONTRACTS.md "Roles"): a producer bound to a tenant reads
    and cancels only its tenant's requests."""

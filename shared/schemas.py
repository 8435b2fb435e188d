"""The messages that cross process boundaries, validated by pydantic at both ends (docs/CONTRACTS.md, "Messages").

Queue entries and token events travel as msgpack (shared.codec); stored results are flat Redis hashes.
Every queue entry carries `v`, the schema version, so a worker can refuse what it does not understand.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inferq.shared.codec import pack
from inferq.shared.errors import BadPayload
from inferq.shared.keys import MODEL_NAME, MODEL_NAME_MAX, Keys

SCHEMA_VERSION = 1
HARD_MAX_TOKENS = 1 << 20  # schema ceiling; the client also applies Settings.max_tokens_limit

Lane = Literal["high", "normal", "low"]
Status = Literal["queued", "running", "done", "failed", "cancelled", "expired"]
FINAL_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled", "expired"})


def pack_events(events: list[dict[str, Any]]) -> bytes:
    """One message on a reply channel: token events of one or more requests (producer/replies.py reads it)."""
    return pack({"v": SCHEMA_VERSION, "events": events})


# Such a message up to its events' array: a script frames events packed one by one with it (shared/lua.py).
EVENTS_HEAD = pack_events([])[:-1]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a message's content is empty")
        return value


class GenerationRequest(BaseModel):
    """One queue entry: what to generate and where to send the answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:\-]+$")
    model: str = Field(min_length=1, max_length=MODEL_NAME_MAX, pattern=MODEL_NAME)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int = Field(256, ge=1, le=HARD_MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=2**31 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what msgpack and vLLM can carry
    ignore_eos: bool | None = None  # vLLM's extension: generate max_tokens, past the end-of-sequence token
    # Publish token events to reply_channel. A request with no reply channel (a bulk line: its one record goes
    # to its reply stream) publishes nothing either way (`publishes`), so it need not say False (8 bytes a line).
    stream: bool = True
    # Tokens per token event after the first (which goes alone, at once); None: the worker's stream_interval.
    stream_interval: int | None = Field(None, ge=1, le=HARD_MAX_TOKENS)
    reply_channel: str | None = None  # the submitting client's pub/sub channel (shared.keys.Keys.tokens)
    reply_stream: str | None = None  # a durable stream that receives the final record (bulk jobs)
    tag: str | None = Field(None, max_length=4096)  # opaque to the worker; echoed in the reply-stream record
    priority: Lane = "normal"
    tenant: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:@\-]+$")
    # Read by nothing: the entry id says when a request was queued. Accepted from clients that still send it;
    # ours leave it out (20 bytes of every entry).
    created_at: float = Field(0.0, allow_inf_nan=False)
    deadline: float | None = Field(None, allow_inf_nan=False)  # unix time after which the request is not started

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt is empty")
        if self.messages is not None and not self.messages:
            raise ValueError("messages is empty")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self

    @property
    def publishes(self) -> bool:
        """Whether token events go out: asked for, and someone to hear them. A worker runs a request that does
        not as unstreamed (its engine batches more tokens per output)."""
        return self.stream and self.reply_channel is not None

    def payload(self) -> dict[str, Any]:
        """The dict that is msgpacked into the stream entry. Fields at their default are left out to keep entries
        small (a million queued requests are a million entries); the reader fills them in again. `v` always
        goes: it says how to read the rest."""
        return {"v": self.v, **self.model_dump(exclude_none=True, exclude_defaults=True)}

    @classmethod
    def from_payload(cls, data: Any) -> GenerationRequest:
        if not isinstance(data, dict):
            raise BadPayload(f"queue entry is a {type(data).__name__}, expected a map")
        if data.get("v") != SCHEMA_VERSION:
            raise BadPayload(f"unsupported schema version {data.get('v')!r}; this worker reads v{SCHEMA_VERSION}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise BadPayload(f"invalid request: {describe_validation_error(exc)}") from exc


class TokenEvent(BaseModel):
    """One request's output of one engine step. `seq` counts events per request from 0 without gaps."""

    model_config = ConfigDict(frozen=True)

    id: str
    seq: int
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    status: Status | None = None  # set on the final event
    # On the final event of a request with stream=False, when the worker's final write stored the result of the run
    # that sent it: that stored result's fields, as in its hash (Result.from_fields). Its client then needs no read.
    result: dict[str, str] | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Timings(BaseModel):
    """Unix timestamps of a request's life; None where it did not get that far."""

    queued_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None


class Result(BaseModel):
    """The stored state of one request: the Redis hash `{p}:r:{id}`."""

    id: str
    status: Status
    model: str = ""
    text: str = ""
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=Timings)
    error: str | None = None
    worker: str | None = None
    attempts: int = 0

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATES

    @classmethod
    def from_hash(cls, request_id: str, raw: dict[bytes, bytes]) -> Result:
        return cls.from_fields(request_id, {k.decode(): v.decode() for k, v in raw.items()})

    @classmethod
    def from_fields(cls, request_id: str, h: dict[str, str]) -> Result:
        """From the stored hash's fields (decoded), or the same fields sent with a final event."""
        get = h.get
        # One validation of the whole (nested) result, from the hash's strings: this runs per request.
        return cls.model_validate({
            "id": request_id, "status": get("status", "queued"), "model": get("model", ""), "text": get("text", ""),
            "finish_reason": get("finish_reason") or None,
            "usage": {"prompt_tokens": get("prompt_tokens", 0), "completion_tokens": get("completion_tokens", 0)},
            "timings": {name: h[name] for name in _TIMINGS if get(name)},
            "error": get("error") or None, "worker": get("worker") or None, "attempts": get("attempts", 0),
        })  # fmt: skip


_TIMINGS = tuple(Timings.model_fields)


_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,200}$")


def salvage(data: Any, model: str, keys: Keys) -> GenerationRequest | None:
    """For a queue entry that failed validation: the request as far as its id and reply targets can be
    trusted, so its result can still end `failed`, its tenant be released and a waiting client or bulk
    collector be told. None if not even the id is usable. Reply targets that are not inferq's own of the
    right kind (keys.is_reply_channel, keys.is_reply_stream_of) are dropped."""
    if not isinstance(data, dict) or not isinstance(data.get("id"), str) or not _ID.match(data["id"]):
        return None
    request_id = data["id"]

    def ours(name: str) -> str | None:
        value = data.get(name)
        if not isinstance(value, str):
            return None
        kind_ok = (
            keys.is_reply_channel(value) if name == "reply_channel" else keys.is_reply_stream_of(value, request_id)
        )
        return value if kind_ok else None

    tenant = data.get("tenant")
    return GenerationRequest.model_construct(
        id=data["id"], model=model, prompt="", stream=data.get("stream") is not False,
        reply_channel=ours("reply_channel"), reply_stream=ours("reply_stream"),
        tenant=tenant if isinstance(tenant, str) and tenant else None,
    )  # fmt: skip


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line, human-readable summary of a pydantic error (for CLI, client and DLQ messages)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors()[:5])

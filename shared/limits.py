"""What a request may be: the limits a producer checks before it enqueues and a worker checks again before it
runs or writes anything (docs/CONTRACTS.md, "Limits"). Each refusal names the limit and its setting."""

from __future__ import annotations

from inferq.shared.errors import InvalidRequest
from inferq.shared.keys import Keys
from inferq.shared.schemas import GenerationRequest
from inferq.shared.settings import Settings


def shown(value: str, most: int = 60) -> str:
    """A value a client sent, quoted for an error message and cut short: never echo a megabyte back."""
    return repr(value if len(value) <= most else value[:most] + "...")


def without_foreign_targets(request: GenerationRequest, keys: Keys) -> GenerationRequest:
    """`request` with every reply target that is not inferq's own of the right kind taken out, so that a
    refusal written for it goes nowhere it should not."""
    channel, stream = request.reply_channel, request.reply_stream
    if channel is not None and not keys.is_reply_channel(channel):
        channel = None
    if stream is not None and not keys.is_reply_stream_of(stream, request.id):
        stream = None
    if (channel, stream) == (request.reply_channel, request.reply_stream):
        return request
    return request.model_copy(update={"reply_channel": channel, "reply_stream": stream})


def check_max_tokens(value: object, settings: Settings) -> None:
    """Refuse a whole number of max_tokens over the limit, naming it (other values are the schema's to refuse)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > settings.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens={value} is above the limit of {settings.max_tokens_limit} (INFERQ_MAX_TOKENS_LIMIT)"
        )


def check_request(request: GenerationRequest, size: int, settings: Settings, keys: Keys) -> None:
    """Raise InvalidRequest for the first limit `request` breaks; `size` is its packed size in bytes."""
    if size > settings.max_request_bytes:
        raise InvalidRequest(
            f"the request is {size:,} bytes, over the limit of {settings.max_request_bytes:,} "
            "(INFERQ_MAX_REQUEST_BYTES)"
        )
    if request.messages is not None and len(request.messages) > settings.max_messages:
        raise InvalidRequest(
            f"{len(request.messages)} messages, over the limit of {settings.max_messages} (INFERQ_MAX_MESSAGES)"
        )
    for stop in request.stop:
        if len(stop) > settings.max_stop_chars:
            raise InvalidRequest(
                f"a stop string of {len(stop):,} characters, over the limit of {settings.max_stop_chars} "
                "(INFERQ_MAX_STOP_CHARS)"
            )
    check_max_tokens(request.max_tokens, settings)
    if request.reply_channel is not None and not keys.is_reply_channel(request.reply_channel):
        raise InvalidRequest(
            f"reply_channel {shown(request.reply_channel)} is not a client's channel under prefix {keys.prefix!r} "
            f"(a worker publishes only to {keys.tokens('CLIENT')}, CLIENT of letters, digits, _ and -)"
        )
    if request.reply_stream is not None and not keys.is_reply_stream_of(request.reply_stream, request.id):
        raise InvalidRequest(
            f"reply_stream {shown(request.reply_stream)} is not a bulk job's reply stream that request "
            f"{shown(request.id)} may write to (a worker appends only to {keys.done('JOB')}, and only for "
            "requests whose id starts bulk-JOB-)"
        )


def wait_limit(request: GenerationRequest, queued_at: float, settings: Settings) -> float:
    """The unix time after which `request`, queued at `queued_at`, is not started but ends `expired`: its
    deadline, or max_queued_s after it was queued if that comes sooner. A worker checks it when it reads the
    entry, a reader of its result after that ends it `expired` (producer/expire.lua); the admission keeps a
    queued result that long, plus result_ttl_s."""
    longest = queued_at + settings.max_queued_s
    return longest if request.deadline is None else min(request.deadline, longest)

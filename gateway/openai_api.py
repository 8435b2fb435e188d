"""OpenAI's chat and completions bodies in, queue requests out, and the answers back in OpenAI's shapes
(https://platform.openai.com/docs/api-reference/chat). A parameter the queue carries maps onto it; one it
cannot honour is refused with a 400 that names it, never silently dropped. A parameter sent at the value that
asks for nothing (`presence_penalty: 0`, `logprobs: false`, ...) is accepted: many clients send defaults."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from inferq.gateway.errors import HttpError
from inferq.shared.schemas import Result

# What the queue carries, by endpoint. `user` is accepted and not used (the API key says who calls).
_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "user", "stream", "stream_options",
           "ignore_eos"}  # fmt: skip
_CHAT = _COMMON | {"messages", "max_completion_tokens"}
_COMPLETIONS = _COMMON | {"prompt"}
# Accepted only at the value that changes nothing; any other value is refused by name.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, None), "frequency_penalty": (0, None), "logprobs": (False, None, 0),
    "top_logprobs": (0, None), "logit_bias": (None, {}), "echo": (False, None), "best_of": (1, None),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, False, True), "response_format": (None, {"type": "text"}),
    "service_tier": (None, "auto", "default"), "store": (None, False), "metadata": (None, {}),
}  # fmt: skip
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class Ask:
    """One OpenAI request, as the queue takes it."""

    chat: bool
    model: str
    submit: dict[str, Any] = field(default_factory=dict)  # keyword arguments of InferenceClient.submit
    stream: bool = False
    include_usage: bool = False


def parse(body: Any, *, chat: bool) -> Ask:
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    known = _CHAT if chat else _COMPLETIONS
    refused = sorted(k for k in body if k not in known and body[k] not in _NEUTRAL.get(k, (object(),)))
    if refused:
        raise HttpError(
            400, f"unsupported parameter(s): {', '.join(refused)} (the queue does not carry them)",
            "unsupported_parameter", param=refused[0],
        )  # fmt: skip
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise HttpError(400, "model is required: a model id from GET /v1/models", param="model")
    if body.get("n", 1) not in (1, None):
        raise HttpError(400, "n must be 1: the queue runs one completion per request", param="n")
    ask = Ask(chat=chat, model=model, stream=_flag(body, "stream"))
    options = body.get("stream_options")
    if options is not None:
        if not ask.stream or not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise HttpError(400, "stream_options takes only include_usage, with stream: true", param="stream_options")
        ask.include_usage = _flag(options, "include_usage")
    submit = ask.submit
    if chat:
        submit["messages"] = _messages(body.get("messages"))
    else:
        submit["prompt"] = _prompt(body.get("prompt"))
    tokens = body.get("max_completion_tokens") if chat else None
    tokens = body.get("max_tokens") if tokens is None else tokens
    if tokens is None and not chat:
        tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    if tokens is not None:
        submit["max_tokens"] = _number(tokens, "max_tokens", whole=True)
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            submit[name] = _number(body[name], name)
    if _flag(body, "ignore_eos"):  # vLLM's extension, as its own server takes it (vllm bench sends it)
        submit["ignore_eos"] = True
    if body.get("seed") is not None:
        submit["seed"] = _number(body["seed"], "seed", whole=True)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise HttpError(400, "stop must be a string or a list of strings", param="stop")
        submit["stop"] = stops
    return ask


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise HttpError(400, f"{name} must be true or false", param=name)
    return bool(value)


def _number(value: Any, name: str, *, whole: bool = False) -> Any:
    kinds = (int,) if whole else (int, float)
    finite = not isinstance(value, float) or math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, kinds) or not finite:
        raise HttpError(400, f"{name} must be {'a whole number' if whole else 'a number'}", param=name)
    return value


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        shape = isinstance(message, dict) and not set(message) - {"role", "content", "name"}
        if not shape or message.get("role") not in _ROLES:
            raise HttpError(
                400, f"{where}: each message is {{role, content}} with role system, developer, user or assistant "
                "(tool calls are not supported)", param=where,
            )  # fmt: skip
        out.append({"role": _ROLES[message["role"]], "content": _content(message.get("content"), where)})
    return out


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (images and audio are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        texts = [p.get("text") for p in content]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)  # type: ignore[arg-type]
    raise HttpError(400, f"{where}.content must be text (a string, or parts of type text)", param=f"{where}.content")


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise HttpError(400, "prompt must be a string (one prompt per request)", param="prompt")
    return prompt


# ---- answers ---------------------------------------------------------------------------------------------
def kind(ask: Ask) -> str:
    """What a request id says it is: `chatcmpl-...` or `cmpl-...` (as OpenAI's own ids), after its tenant."""
    return "chatcmpl" if ask.chat else "cmpl"


def ask_of(request_id: str) -> Ask | None:
    """What a gateway request asked for, as far as its id tells (None: not a gateway request)."""
    tail = request_id.rpartition(":")[2]
    if tail.startswith("chatcmpl-"):
        return Ask(chat=True, model="")
    return Ask(chat=False, model="") if tail.startswith("cmpl-") else None


def usage(result: Result) -> dict[str, int]:
    return {
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "total_tokens": result.usage.total_tokens,
    }


def completion(ask: Ask, request_id: str, result: Result) -> dict[str, Any]:
    """The whole answer of a request that ended `done`."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason or "stop", "logprobs": None}
    if ask.chat:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    return {
        "id": request_id, "object": "chat.completion" if ask.chat else "text_completion",
        "created": int(result.timings.finished_at or time.time()), "model": ask.model, "choices": [choice],
        "usage": usage(result),
    }  # fmt: skip


def chunk(ask: Ask, request_id: str, created: int, text: str | None, finish_reason: str | None = None,
          *, first: bool = False) -> dict[str, Any]:  # fmt: skip
    """One streamed piece: `first` carries the assistant role (chat), the last one a finish_reason."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if ask.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {
        "id": request_id, "object": "chat.completion.chunk" if ask.chat else "text_completion",
        "created": created, "model": ask.model, "choices": [choice],
    }  # fmt: skip


def usage_chunk(ask: Ask, request_id: str, created: int, result: Result) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    return {**chunk(ask, request_id, created, None), "choices": [], "usage": usage(result)}

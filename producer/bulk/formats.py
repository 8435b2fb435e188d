"""The lines of a bulk job: two input formats in, the matching output records out.

Simple lines: {"custom_id"?, "prompt" | "messages", "max_tokens", "temperature", ...}; the line number is the
custom_id when none is given. Output: {"custom_id", "text", "finish_reason", "usage", "error"}.

OpenAI Batch lines: {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {...}}. Output in the shape `vllm run-batch` and the OpenAI Batch API write: {"id", "custom_id",
"response": {"status_code", "request_id", "body": chat.completion | text_completion}, "error"}.

Parsing here only maps a line to request parameters; the client's own validation (build_request) decides
whether they make a valid request, so a bulk line and a submit are held to the same rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SIMPLE, OPENAI = "simple", "openai"
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed")
# OpenAI body fields we cannot honour: refusing the line beats silently returning something else.
_UNSUPPORTED = {"tools": None, "functions": None, "logprobs": False, "stream": False, "n": 1, "best_of": 1}


@dataclass(frozen=True)
class BulkLine:
    number: int  # 1-based line number in the input file
    custom_id: str
    kind: str  # SIMPLE or OPENAI
    endpoint: str  # "chat" or "text" (simple lines: from prompt/messages)
    params: dict[str, Any]  # keyword arguments for InferenceClient.build_request


@dataclass(frozen=True)
class LineError:
    number: int
    custom_id: str
    kind: str
    message: str


def refused(line: BulkLine, exc: Exception) -> LineError:
    """A line that parsed but does not make a valid request (the client's own rules said why)."""
    return LineError(line.number, line.custom_id, line.kind, f"line {line.number} ({line.custom_id}): {exc}")


def duplicate(number: int, custom_id: str, kind: str, first: int) -> LineError:
    return LineError(
        number, custom_id, kind, f"line {number}: duplicate custom_id {custom_id!r} (first on line {first})"
    )


def _kind_of(data: dict[str, Any]) -> str:
    return OPENAI if "url" in data or "body" in data else SIMPLE


def file_kind(lines: Iterable[tuple[int, str]]) -> str:
    """The format of a file: that of its first line that is a JSON object (SIMPLE if none is). The records of
    lines that are not even JSON take this shape, so that every record of one output file has one shape."""
    for _, text in lines:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return _kind_of(data)
    return SIMPLE


def parse_line(number: int, text: str, default_model: str, file_format: str = SIMPLE) -> BulkLine | LineError:
    """One input line to request parameters, or the reason it cannot be one (for a line that is not a JSON
    object, in the file's format)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return LineError(number, f"line-{number}", file_format, f"line {number} is not JSON: {exc.msg}")
    if not isinstance(data, dict):
        return LineError(
            number, f"line-{number}", file_format, f"line {number} is a JSON {type(data).__name__}, not an object"
        )
    kind = _kind_of(data)
    custom_id = data.get("custom_id", f"line-{number}" if kind == SIMPLE else None)
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(number, f"line-{number}", kind, f"line {number}: custom_id must be a non-empty string")
    try:
        endpoint, params = _openai(data, default_model) if kind == OPENAI else _simple(data, default_model)
    except ValueError as exc:
        return LineError(number, custom_id, kind, f"line {number} ({custom_id}): {exc}")
    return BulkLine(number, custom_id, kind, endpoint, params)


def _simple(data: dict[str, Any], default_model: str) -> tuple[str, dict[str, Any]]:
    known = {"custom_id", "prompt", "messages", "model", *_PARAMS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    params = {k: data[k] for k in ("prompt", "messages", *_PARAMS) if k in data}
    params["model"] = data.get("model") or default_model
    return ("chat" if "messages" in data else "text"), params


def _openai(data: dict[str, Any], default_model: str) -> tuple[str, dict[str, Any]]:
    if data.get("method", "POST") != "POST":
        raise ValueError(f"method {data.get('method')!r} is not supported; use POST")
    endpoint = ENDPOINTS.get(data.get("url", ""))
    if endpoint is None:
        raise ValueError(f"url {data.get('url')!r} is not supported; use {' or '.join(ENDPOINTS)}")
    body = data.get("body")
    if not isinstance(body, dict):
        raise ValueError("body must be an object")
    for name, fine in _UNSUPPORTED.items():
        if body.get(name, fine) not in (fine, None):
            raise ValueError(f"body.{name}={body[name]!r} is not supported")
    params: dict[str, Any] = {k: body[k] for k in ("temperature", "top_p", "top_k", "seed") if k in body}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    if "stop" in body and body["stop"] is not None:
        params["stop"] = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
    params["model"] = body.get("model") or default_model
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ValueError("body.messages must be a list")
        params["messages"] = [_message(m) for m in messages]
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("body.prompt must be one string (one prompt per line)")
        params["prompt"] = prompt
    return endpoint, params


def _message(m: Any) -> dict[str, Any]:
    """An OpenAI chat message; content given as a list of text parts is joined."""
    if not isinstance(m, dict):
        raise ValueError("each message must be an object")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise ValueError("only text content parts are supported")
        content = "".join(str(p.get("text", "")) for p in content)
    return {"role": m.get("role"), "content": content}


def output_record(line: BulkLine, model: str, result: dict[str, Any]) -> dict[str, Any]:
    """The output line of a request that ended; `result` is its durable record (status, text, usage...)."""
    usage = {
        "prompt_tokens": int(result.get("prompt_tokens", 0)),
        "completion_tokens": int(result.get("completion_tokens", 0)),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    ok = result.get("status") == "done"
    error = None if ok else (result.get("error") or f"request ended {result.get('status')}")
    if line.kind == SIMPLE:
        return {
            "custom_id": line.custom_id, "text": result.get("text", ""),
            "finish_reason": result.get("finish_reason"), "usage": usage, "error": error,
        }  # fmt: skip
    request_id = str(result.get("id", ""))
    if not ok:
        return {
            "id": f"inferq-{request_id}", "custom_id": line.custom_id,
            "response": {"status_code": 500, "request_id": request_id, "body": None},
            "error": {"code": result.get("status"), "message": error},
        }  # fmt: skip
    created = int(float(result.get("finished_at", 0) or 0))
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.get("finish_reason"), "logprobs": None}
    if line.endpoint == "chat":
        choice["message"] = {"role": "assistant", "content": result.get("text", "")}
        body = {"id": f"chatcmpl-{request_id}", "object": "chat.completion"}
    else:
        choice["text"] = result.get("text", "")
        body = {"id": f"cmpl-{request_id}", "object": "text_completion"}
    body |= {"created": created, "model": model, "choices": [choice], "usage": usage}
    return {
        "id": f"inferq-{request_id}", "custom_id": line.custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None,
    }  # fmt: skip


def make_tag(
    number: int, kind: str, endpoint: str, model: str, custom_id: str, job: tuple[str, str] | None = None
) -> str:
    """A request's tag: what the output writer needs to make the line's output record from its reply-stream
    record. With `job` (the job's format and model), a line of both says neither: [number, endpoint,
    custom_id], since every byte of it is held in Redis for each queued line; else [number, format, endpoint,
    model, custom_id]."""
    fields = [number, endpoint, custom_id] if job == (kind, model) else [number, kind, endpoint, model, custom_id]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def read_tag(tag: str, job: tuple[str, str]) -> tuple[int, str, str, str, str]:
    """(number, format, endpoint, model, custom_id) of a tag; `job` (its format and model) fills a short one."""
    fields = json.loads(tag)
    if len(fields) == 3:
        number, endpoint, custom_id = fields
        return number, job[0], endpoint, job[1], custom_id
    number, kind, endpoint, model, custom_id = fields
    return number, kind, endpoint, model, custom_id


def error_record(error: LineError) -> dict[str, Any]:
    """The output line of an input line that never became a request."""
    if error.kind == SIMPLE:
        return {
            "custom_id": error.custom_id,
            "text": None,
            "finish_reason": None,
            "usage": None,
            "error": error.message,
        }
    return {
        "id": f"inferq-line-{error.number}", "custom_id": error.custom_id,
        "response": {"status_code": 400, "request_id": f"line-{error.number}", "body": None},
        "error": {"code": "invalid_request", "message": error.message},
    }  # fmt: skip

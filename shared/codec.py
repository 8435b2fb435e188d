"""The only msgpack codec: every payload that crosses a process boundary goes through here. Never pickle."""

from __future__ import annotations

from typing import Any

import msgpack

from inferq.shared.errors import BadPayload


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(raw: bytes) -> Any:
    """Decode msgpack; anything malformed raises BadPayload (so poison input has one error type)."""
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise BadPayload(f"undecodable msgpack payload: {exc.__class__.__name__}: {exc}") from exc


def text(value: Any) -> str:
    """A Redis reply value as str (the client returns bytes; ids and names are ASCII/UTF-8)."""
    return value.decode() if isinstance(value, bytes) else str(value)

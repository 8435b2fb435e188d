"""The gateway's API keys (gateway/callers.py), alone: where they come from, what a bad entry says (never the
key), who a header names, and what a caller owns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inferq.gateway.callers import ANONYMOUS, ApiKeys
from inferq.gateway.errors import HttpError
from inferq.gateway.server import loopback
from inferq.shared.errors import ConfigError
from inferq.shared.settings import Settings

KEY = "sk-test-0123456789abcdef"


def keys(**settings: object) -> ApiKeys:
    return ApiKeys.from_settings(Settings(**settings))  # type: ignore[arg-type]


def test_keys_from_a_file_name_their_tenant_models_and_cap(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({KEY: {"tenant": "acme", "models": ["smollm2"], "max_unfinished": 3}}))
    table = keys(api_keys_file=path)
    caller = table.caller(f"Bearer {KEY}")
    assert (caller.tenant, caller.may_use("smollm2"), caller.may_use("tiny")) == ("acme", True, False)
    assert table.tenant_caps() == {"acme": 3} and caller.label != KEY and KEY not in repr(caller)
    assert caller.request_id("chatcmpl").startswith("acme:chatcmpl-")
    assert caller.request_id("cmpl", "k1") == caller.request_id("cmpl", "k1") != caller.request_id("cmpl", "k2")
    assert caller.owns("acme:cmpl-x") and not caller.owns("bolt:cmpl-x") and not caller.owns("acmex:cmpl-x")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not json", "not valid JSON"),
        ("[]", "JSON object"),
        (json.dumps({"short": "acme"}), "at least 16 characters"),
        (json.dumps({KEY: "no:colon"}), "tenant must be"),
        (json.dumps({KEY: {"tenant": "a", "max_unfinished": 0}}), "max_unfinished"),
        (json.dumps({KEY: {"tenant": "a", "colour": "red"}}), "give a tenant"),
    ],
)
def test_a_bad_entry_is_named_by_position_never_by_its_key(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as bad:
        keys(api_keys=text)
    assert KEY not in str(bad.value)


def test_who_a_header_names() -> None:
    table = keys(api_keys=json.dumps({KEY: "acme"}))
    for header in (None, "", "Bearer ", f"Basic {KEY}"):
        with pytest.raises(HttpError, match="missing API key") as missing:
            table.caller(header)
        assert missing.value.status == 401
    with pytest.raises(HttpError, match="unknown API key"):
        table.caller("Bearer sk-wrong-0123456789abcdef")
    assert keys().caller(None) is ANONYMOUS and not keys().required  # no keys: one anonymous caller


def test_without_keys_only_loopback_addresses() -> None:
    assert all(loopback(host) for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"))
    assert not any(loopback(host) for host in ("0.0.0.0", "::", "10.0.0.1", "example.com"))

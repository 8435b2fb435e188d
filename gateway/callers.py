"""Who is calling: API keys, each mapped to a tenant (docs/CONTRACTS.md, "Gateway").

Keys come from `INFERQ_API_KEYS` (a JSON object) or `INFERQ_API_KEYS_FILE` (a file holding one), as
`{"KEY": "TENANT"}` or `{"KEY": {"tenant": "TENANT", "models": ["smollm2"]}}`. Keys are held as their
SHA-256 only, looked up by the digest of what a caller sends, and never logged or echoed. Without keys the
gateway serves everyone as one anonymous caller, and listens on loopback only (server.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferq.gateway.errors import HttpError
from inferq.shared.errors import ConfigError
from inferq.shared.keys import TENANT_NAME, Keys
from inferq.shared.settings import Settings


@dataclass(frozen=True)
class Caller:
    tenant: str | None  # None: the anonymous caller of a gateway without keys
    models: frozenset[str] | None = None  # None: any model
    max_unfinished: int | None = None  # per model, queued or running; None: INFERQ_TENANT_CAP
    label: str = "anonymous"  # for logs: the first characters of the key's digest, never the key

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def request_id(self, kind: str, idempotency_key: str | None = None) -> str:
        """An id this caller owns, `TENANT:KIND-hex` (the producer role's scope; `KIND-hex` without keys):
        fresh, or the same for every request that carries the same Idempotency-Key."""
        if idempotency_key is None:
            tail = uuid.uuid4().hex
        else:  # the caller's key scopes it too: two callers' keys never meet
            tail = "idem-" + hashlib.sha256(f"{self.label}\0{idempotency_key}".encode()).hexdigest()[:32]
        raw = f"{kind}-{tail}"
        return raw if self.tenant is None else Keys.tenant_scoped(self.tenant, raw)

    def owns(self, request_id: str) -> bool:
        """A key reads and cancels only its own tenant's requests."""
        return self.tenant is None or request_id.startswith(Keys.tenant_scoped(self.tenant, ""))


ANONYMOUS = Caller(tenant=None)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, callers: dict[str, Caller]) -> None:
        self._by_digest = callers  # sha256(key) -> caller

    @property
    def required(self) -> bool:
        return bool(self._by_digest)

    def tenant_caps(self) -> dict[str, int]:
        """Each capped tenant's cap (the tightest of its keys': the count is the tenant's, not a key's)."""
        caps: dict[str, int] = {}
        for caller in self._by_digest.values():
            if caller.tenant is not None and caller.max_unfinished is not None:
                caps[caller.tenant] = min(caps.get(caller.tenant, caller.max_unfinished), caller.max_unfinished)
        return caps

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        if settings.api_keys is not None and settings.api_keys_file is not None:
            raise ConfigError("set INFERQ_API_KEYS or INFERQ_API_KEYS_FILE, not both")
        if settings.api_keys_file is not None:
            source, path = "INFERQ_API_KEYS_FILE", Path(settings.api_keys_file)
            try:
                text = path.read_text()
            except OSError as exc:
                raise ConfigError(f"INFERQ_API_KEYS_FILE: cannot read {path} ({exc.strerror})") from None
        elif settings.api_keys is not None:
            source, text = "INFERQ_API_KEYS", settings.api_keys.get_secret_value()
        else:
            return cls({})
        return cls(_parse(source, text))

    def caller(self, authorization: str | None) -> Caller:
        """The caller an `Authorization: Bearer KEY` header names; 401 if it names none we know."""
        if not self.required:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise HttpError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'", "invalid_api_key")
        caller = self._by_digest.get(_digest(key.strip()))
        if caller is None:
            raise HttpError(401, "unknown API key", "invalid_api_key")
        return caller


def _parse(source: str, text: str) -> dict[str, Caller]:
    """{digest: caller} from the JSON; errors name the entry by position, never by its key."""
    try:
        table = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(table, dict) or not table:
        raise ConfigError(f'{source} must be a JSON object of API keys: {{"KEY": "TENANT", ...}}')
    callers = {}
    for n, (key, spec) in enumerate(table.items(), 1):
        callers[_digest(key)] = _caller(f"{source}, key {n}", key, spec)
    return callers


def _caller(where: str, key: str, spec: Any) -> Caller:
    if not isinstance(key, str) or len(key) < 16:
        raise ConfigError(f"{where}: an API key must be a string of at least 16 characters")
    if isinstance(spec, str):
        spec = {"tenant": spec}
    if not isinstance(spec, dict) or set(spec) - {"tenant", "models", "max_unfinished"}:
        raise ConfigError(f'{where}: give a tenant, or {{"tenant": "...", "models": [...], "max_unfinished": N}}')
    tenant = spec.get("tenant")
    if not isinstance(tenant, str) or not re.fullmatch(TENANT_NAME, tenant):
        raise ConfigError(f"{where}: the tenant must be letters, digits, _ and -, at most 64")
    models = spec.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise ConfigError(f"{where}: models must be a list of model names")
    cap = spec.get("max_unfinished")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(f"{where}: max_unfinished must be a whole number of at least 1")
    return Caller(tenant, None if models is None else frozenset(models), cap, label=_digest(key)[:8])

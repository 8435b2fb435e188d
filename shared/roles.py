"""Redis ACL rules for inferq's roles (docs/CONTRACTS.md, "Roles"): what each kind of process may touch.

- `worker` and `ops` (status, dead letters, bulk jobs, the bulk runner): every key and channel under the
  prefix and nothing else; no dangerous command (FLUSHALL, CONFIG, KEYS, DEBUG, ...) but INFO, which arq reads
  when its runner starts.
- `producer`, bound to one tenant (`INFERQ_TENANT`): it may add requests (through the admission script) and
  cancel them, read its own tenant's results and subscribe to its own tenant's reply channels. It can read
  no queue entry (no one else's prompt), no other tenant's result or token stream, no worker key, no dead
  letter, and cannot list keys.

A Redis script runs with its caller's rights, so the producer's commands include those its scripts call
(producer/admit.lua, cancel.lua, expire.lua) and its key patterns cover what they touch.
"""

from __future__ import annotations

import hashlib
import re

from inferq.shared.errors import ConfigError
from inferq.shared.keys import TENANT_NAME, Keys

ROLES = ("worker", "producer", "ops")

_PREFIX_WIDE = "+@all -@dangerous +info"
# The producer's commands: its own (connect, submit, read, cancel, subscribe), then its scripts'.
_PRODUCER_COMMANDS = (
    "+ping", "+client|setinfo", "+client|setname", "+select", "+evalsha", "+script|load", "+hgetall",
    "+subscribe", "+unsubscribe", "+xlen", "+exists", "+xgroup|create", "+xinfo|groups", "+hget", "+hincrby",
    "+xadd", "+hset", "+expire", "+publish", "+zadd",
    # A client asks whether the server is a cluster node, and redis-py's cluster client reads the slots and
    # the command table when it starts.
    "+cluster|info", "+cluster|slots", "+cluster|shards", "+command",
)  # fmt: skip


def rules(role: str, keys: Keys, tenant: str | None = None) -> list[str]:
    """The ACL rules of `role` for the prefix of `keys` (what follows `user NAME on <password>`)."""
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    base = ["resetkeys", "resetchannels", "-@all"]
    if role != "producer":
        if tenant is not None:
            raise ConfigError(f"the {role} role serves every tenant; --tenant is for the producer role")
        return [*base, f"~{keys.prefix}:*", f"&{keys.prefix}:*", *_PREFIX_WIDE.split()]
    if tenant is None or not re.fullmatch(TENANT_NAME, tenant):
        raise ConfigError(
            "the producer role is bound to one tenant: give --tenant (the client's INFERQ_TENANT: letters, "
            "digits, _ and -, at most 64)"
        )
    return [
        *base,
        f"%RW~{keys.queues_pattern()}",  # the admission adds entries; no command that reads one is granted
        f"%RW~{keys.results_pattern(keys.tenant_scoped(tenant, ''))}",
        f"%RW~{keys.tenants_pattern()}",
        f"%RW~{keys.refusals_pattern()}",
        f"%W~{keys.models_index()}",  # lists the models it admits to, for `inferq status`
        f"&{keys.tokens(keys.tenant_scoped(tenant, '*'))}",
        f"&{keys.cancel()}",
        *_PRODUCER_COMMANDS,
    ]


def acl_line(user: str, password: str, role: str, keys: Keys, tenant: str | None = None) -> str:
    """One line of an ACL file: the user, on, its password as a SHA-256 (never the password itself)."""
    if not password:
        raise ConfigError("the user's password is empty")
    digest = hashlib.sha256(password.encode()).hexdigest()
    return " ".join(["user", user, "on", f"#{digest}", *rules(role, keys, tenant)])

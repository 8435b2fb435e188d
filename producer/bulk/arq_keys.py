"""arq, with every key it writes under inferq's key prefix.

arq names its job, result, retry and in-progress keys and its abort set with fixed `arq:` prefixes (module
constants, not settings). This connection moves each of them under the key prefix as it goes out
(`Keys.arq_own`), so a prefix-scoped ACL covers them and nothing inferq writes lands outside its prefix.
Only names that start with `arq:` move: the queue (`Keys.arq_queue`), its health-check key and the job ids
are inferq's own and already carry the prefix; arq's payloads are msgpack, never such a string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio.client import Pipeline

from inferq.shared.keys import Keys

_ARQ = "arq:"


def _moved(keys: Keys, args: Sequence[Any]) -> tuple[Any, ...]:
    out = []
    for arg in args:
        if isinstance(arg, str) and arg.startswith(_ARQ):
            arg = keys.arq_own(arg)
        elif isinstance(arg, bytes) and arg.startswith(_ARQ.encode()):
            arg = keys.arq_own(arg.decode()).encode()
        out.append(arg)
    return tuple(out)


class _PrefixedPipeline(Pipeline):
    def __init__(self, keys: Keys, *args: Any) -> None:
        super().__init__(*args)
        self._keys = keys

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return super().execute_command(*_moved(self._keys, args), **kwargs)


class PrefixedArqRedis(ArqRedis):
    def __init__(self, keys: Keys, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keys = keys

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        return await super().execute_command(*_moved(self._keys, args), **options)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return _PrefixedPipeline(self._keys, self.connection_pool, self.response_callbacks, transaction, shard_hint)

"""The Batch API's files (docs/CONTRACTS.md, "Gateway"): kept in Redis, where every gateway reads them, each
for INFERQ_GATEWAY_FILE_TTL_S and at most INFERQ_GATEWAY_MAX_FILE_BYTES. A file belongs to the tenant that
uploaded it; for any other key it does not exist."""

from __future__ import annotations

import time
import uuid
from typing import Any

from redis.asyncio import Redis

from inferq.shared.codec import text
from inferq.shared.connection import pipeline
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings

_LISTED = 100  # files a list shows, newest first
_FIELDS = ("owner", "filename", "purpose", "bytes", "created_at")  # a file's record, without its data


def file_object(file_id: str, meta: dict[str, str], ttl_s: int) -> dict[str, Any]:
    created = int(float(meta.get("created_at", "0")))
    return {
        "id": file_id, "object": "file", "bytes": int(meta.get("bytes", "0")), "created_at": created,
        "expires_at": created + ttl_s, "filename": meta.get("filename", ""), "purpose": meta.get("purpose", ""),
        "status": "processed",
    }  # fmt: skip


class Files:
    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = settings.gateway_file_ttl_s

    async def create(self, owner: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex}"
        meta = {"owner": owner, "filename": filename, "purpose": purpose, "bytes": str(len(data)),
                "created_at": repr(time.time())}  # fmt: skip
        key, index = self.keys.file(file_id), self.keys.files(owner)
        async with pipeline(self.redis, atomic=True) as pipe:
            pipe.hset(key, mapping={**meta, "data": data})
            pipe.expire(key, self.ttl_s)
            pipe.zadd(index, {file_id: time.time()})
            pipe.zremrangebyscore(index, "-inf", time.time() - self.ttl_s)  # files expired by now
            pipe.expire(index, self.ttl_s)
            await pipe.execute()
        return file_object(file_id, meta, self.ttl_s)

    async def meta(self, owner: str, file_id: str) -> dict[str, str] | None:
        """The file's record (without its data), if it exists and is `owner`'s."""
        (meta,) = await self._metas(owner, [file_id])
        return meta

    async def _metas(self, owner: str, file_ids: list[str]) -> list[dict[str, str] | None]:
        """Each file's record, in one round trip; None for one that is gone or not `owner`'s."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for file_id in file_ids:
                pipe.hmget(self.keys.file(file_id), _FIELDS)
            rows = await pipe.execute()
        metas = [{f: text(v) for f, v in zip(_FIELDS, row, strict=True) if v is not None} for row in rows]
        return [meta if meta.get("owner") == owner else None for meta in metas]

    async def get(self, owner: str, file_id: str) -> dict[str, Any] | None:
        meta = await self.meta(owner, file_id)
        return None if meta is None else file_object(file_id, meta, self.ttl_s)

    async def content(self, owner: str, file_id: str) -> bytes | None:
        found, data = await self.redis.hmget(self.keys.file(file_id), ["owner", "data"])  # type: ignore[misc]
        return data if found is not None and text(found) == owner else None  # type: ignore[no-any-return]

    async def delete(self, owner: str, file_id: str) -> bool:
        if await self.meta(owner, file_id) is None:
            return False
        async with pipeline(self.redis, atomic=True) as pipe:
            pipe.delete(self.keys.file(file_id))
            pipe.zrem(self.keys.files(owner), file_id)
            await pipe.execute()
        return True

    async def list(self, owner: str) -> list[dict[str, Any]]:
        ids = [text(i) for i in await self.redis.zrevrange(self.keys.files(owner), 0, _LISTED - 1)]
        metas = await self._metas(owner, ids)
        return [file_object(i, meta, self.ttl_s) for i, meta in zip(ids, metas, strict=True) if meta is not None]

"""A thin blocking wrapper for code that is not async: the async client runs on a private loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

from inferq.producer.client import InferenceClient, RequestHandle
from inferq.shared.schemas import Result, TokenEvent
from inferq.shared.settings import Settings, load_settings

T = TypeVar("T")


class SyncRequestHandle:
    def __init__(self, owner: SyncInferenceClient, handle: RequestHandle) -> None:
        self._owner = owner
        self._handle = handle
        self.id = handle.id

    def tokens(self) -> Iterator[TokenEvent]:
        events = self._handle.tokens()
        while True:
            try:
                yield self._owner._call(events.__anext__())
            except StopAsyncIteration:
                return

    def result(self, timeout: float | None = None) -> Result:
        return self._owner._call(self._handle.result(timeout=timeout))


class SyncInferenceClient:
    """`with SyncInferenceClient(settings) as client: client.generate(prompt=...)`; same methods as the async one."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="inferq-sync-client", daemon=True)
        self._thread.start()
        self._client = InferenceClient(settings or load_settings())
        self._call(self._client.start())

    @classmethod
    def from_url(cls, url: str | None = None, **settings: Any) -> SyncInferenceClient:
        return cls(load_settings(redis_url=url, **settings))

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, **kwargs: Any) -> SyncRequestHandle:
        return SyncRequestHandle(self, self._call(self._client.submit(**kwargs)))

    def generate(self, **kwargs: Any) -> Result:
        return self._call(self._client.generate(**kwargs))

    def get(self, request_id: str) -> Result:
        return self._call(self._client.get(request_id))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncInferenceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

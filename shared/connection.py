"""Opening Redis: the given INFERQ_REDIS_URL, or the embedded server (started on first use).

A URL that names any node of a Redis (or Valkey) Cluster is enough: `open_redis` asks the server, and a
cluster gets redis-py's cluster client. Its pipelines have no MULTI/EXEC (`pipeline(atomic=True)` then sends
a plain pipeline: each command and each script still atomic, the lot not) and it has no pub/sub (`node_client`
gives a plain client of one node: a classic PUBLISH reaches the subscribers of every node).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeGuard, TypeVar
from urllib.parse import urlsplit

import hiredis
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.backoff import EqualJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    DataError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from inferq.shared.embedded import EmbeddedServer
from inferq.shared.errors import InferqError, PermissionDenied, RedisUnavailable
from inferq.shared.settings import Settings

T = TypeVar("T")
P = ParamSpec("P")

# What a Redis outage looks like to a caller: retry with Backoff; anything else is a real error.
OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError)
# A connection Redis refused for its user (wrong password, user disabled): an outage to redis-py, not to us.
REFUSED_USER = (AuthenticationError, AuthorizationError)
# Refusals that pass (out of memory, a replica or a server still loading after a failover, a busy script,
# a cluster reshaping): the write is tried again until it lands. Any other refusal (no permission, a key of
# the wrong type) will not pass by waiting.
_PASSING = (OutOfMemoryError, ReadOnlyError, TryAgainError, ClusterDownError)
_PASSING_CODES = ("BUSY ", "MISCONF ", "NOREPLICAS ", "MASTERDOWN ", "LOADING ")


def passing_refusal(exc: BaseException) -> bool:
    """Whether Redis refused a command for a reason that passes with time (retry), not for what it asked."""
    if isinstance(exc, _PASSING):
        return True
    # redis-py prefixes a pipeline's error with where it happened; the server's code follows "error: ".
    message = str(exc).rpartition("error: ")[2] if "of pipeline caused error: " in str(exc) else str(exc)
    return isinstance(exc, ResponseError) and message.startswith(_PASSING_CODES)


class Backoff:
    """How long to wait before talking to Redis again: about 50 ms, doubling, at most 2 s; reset on success.

    Jittered (redis-py's EqualJitterBackoff: each wait is between half and all of the doubled one), so a
    fleet that lost Redis at the same moment does not reconnect in lockstep."""

    FIRST_S, MAX_S = 0.05, 2.0

    def __init__(self) -> None:
        self._strategy = EqualJitterBackoff(cap=self.MAX_S, base=self.FIRST_S)
        self._failures = 0

    @property
    def failures(self) -> int:
        """Attempts that failed since the start or the last reset."""
        return self._failures

    def next(self) -> float:
        """The wait before the next attempt (each call doubles the one after, up to MAX_S)."""
        delay = self._strategy.compute(self._failures)
        self._failures += 1
        return delay

    def reset(self) -> None:
        self._failures = 0


def as_inferq_error(exc: BaseException, what: str) -> InferqError | None:
    """The InferqError a caller gets for a Redis error met while trying to `what`; None for other errors."""
    if isinstance(exc, REFUSED_USER):
        return PermissionDenied(f"Redis refused the user while trying to {what} ({exc}): check INFERQ_REDIS_URL")
    if isinstance(exc, NoPermissionError):
        return PermissionDenied(
            f"this Redis user may not {what} ({exc}): a producer bound to a tenant (INFERQ_TENANT) adds, reads "
            "and cancels only its tenant's requests, with ids that start 'TENANT:'; status, dead letters and "
            'bulk jobs need the ops role (docs/CONTRACTS.md, "Roles")'
        )
    if isinstance(exc, OUTAGE) and not isinstance(exc, InferqError):
        return RedisUnavailable(f"cannot reach Redis while trying to {what} ({exc})")
    return None


def redis_errors(what: str) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Decorate a public async method: a Redis error it meets reaches the caller as an InferqError
    (PermissionDenied, RedisUnavailable) that says what it was trying to do."""

    def decorate(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(method)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await method(*args, **kwargs)
            except RedisError as exc:
                error = as_inferq_error(exc, what)
                if error is None:
                    raise
                raise error from exc

        return wrapper

    return decorate


async def retry_outages(
    call: Callable[[], Awaitable[T]], what: str, log: logging.Logger, *, say_once: bool = False
) -> T:
    """`call()` until Redis answers it, waiting `Backoff` between tries; each failed try is logged as `what`
    (only the first with `say_once`). For writes and checks that must not be lost to an outage."""
    backoff = None  # made at the first failure: most calls (one per request, some) succeed at once
    while True:
        try:
            return await call()
        except REFUSED_USER:
            raise  # wrong credentials do not get better by waiting
        except OUTAGE as exc:
            backoff = backoff or Backoff()
            delay = backoff.next()
            if not say_once or backoff.failures == 1:
                log.warning("%s (Redis unreachable: %s); retrying in %.2fs", what, exc, delay)
            await asyncio.sleep(delay)


async def wait_for_redis(redis: Redis, what: str, log: logging.Logger) -> None:
    """Until Redis answers a PING; says once what waits (a worker that starts while Redis restarts waits for
    it as a running one would)."""
    await retry_outages(redis.ping, f"{what}: waiting for Redis", log, say_once=True)


def embedded_server(settings: Settings) -> EmbeddedServer:
    return EmbeddedServer(
        settings.data_dir, settings.embedded_port, fsync=settings.embedded_fsync, malloc=settings.embedded_malloc
    )


def resolve_url(settings: Settings) -> str:
    """The URL to use. With no INFERQ_REDIS_URL this starts the embedded server if it is not running."""
    if settings.redis_url:
        return settings.redis_url
    server = embedded_server(settings)
    server.start()
    return server.url


# A dead connection is noticed in seconds, not hours: a connect gives up after CONNECT_TIMEOUT_S; an idle
# TCP connection is probed after 5 s and dropped after 3 unanswered probes 2 s apart; data a peer stops
# acknowledging fails the connection after 15 s (TCP_USER_TIMEOUT). Each failure is an OUTAGE: the caller's
# Backoff retries. No read timeout: a worker's blocking XREAD and a subscriber's wait are meant to be long.
CONNECT_TIMEOUT_S = 5.0
HEALTH_CHECK_S = 10  # a connection idle this long is PINGed before it is used again
_KEEPALIVE = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": 15_000}


def connection_options(url: str) -> dict[str, Any]:
    """How every inferq connection to `url` is made (the options its scheme takes: a unix socket has no TCP
    keepalive). A `rediss://` server's certificate must name its host unless the URL says
    `ssl_check_hostname=false`; options in the URL's query win over these."""
    scheme = urlsplit(url).scheme
    options: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT_S, "health_check_interval": HEALTH_CHECK_S}
    if scheme in ("redis", "rediss"):
        probes = {getattr(socket, name): value for name, value in _KEEPALIVE.items() if hasattr(socket, name)}
        options.update(socket_keepalive=True, socket_keepalive_options=probes)
    if scheme == "rediss":
        options["ssl_check_hostname"] = True
    return options


class _HiredisPacking(AbstractConnection):
    """Commands packed by hiredis (C), not by redis-py's Python loop: redis-py 5.3's asyncio connection never
    uses hiredis to pack (its sync one does), and packing was a sixth of a busy worker's CPU. The same bytes go
    on the wire; an encoding other than strict UTF-8 keeps redis-py's own packing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        encoding = self.encoder.encoding.lower()
        self._hiredis_packs = encoding in ("utf-8", "utf8") and self.encoder.encoding_errors == "strict"

    def pack_command(self, *args: Any) -> list[bytes]:
        if not self._hiredis_packs:
            return super().pack_command(*args)
        return [_hiredis_pack(args)]

    def pack_commands(self, commands: Any) -> list[bytes]:
        if not self._hiredis_packs:
            return super().pack_commands(commands)
        return [b"".join([_hiredis_pack(tuple(args)) for args in commands])]


def _hiredis_pack(args: tuple[Any, ...]) -> bytes:
    # As redis-py does: a command name given with its subcommand ("CLIENT LIST") goes as separate arguments.
    name = args[0]
    if (" " if isinstance(name, str) else b" ") in name:
        args = (*name.split(), *args[1:])
    try:
        return hiredis.pack_command(args)
    except TypeError as exc:  # what redis-py raises for a value it cannot send (None, a bool, a list)
        raise DataError(str(exc)) from exc


@functools.cache
def _packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """`connection_class` (plain, TLS or unix socket, as the URL says) with hiredis packing its commands."""
    return type(connection_class.__name__, (_HiredisPacking, connection_class), {})


def connect(settings: Settings, *, max_connections: int = 64, url: str | None = None) -> Redis:
    """An asyncio client of one server over a blocking pool: callers wait for a free connection instead of
    failing with MaxConnectionsError when many coroutines issue commands at once. (`open_redis` also sees a
    cluster.)"""
    target = url or resolve_url(settings)
    pool = BlockingConnectionPool.from_url(
        target, max_connections=max_connections, timeout=30, **connection_options(target)
    )
    pool.connection_class = _packing(pool.connection_class)
    return Redis(connection_pool=pool)


async def is_cluster_node(url: str) -> bool:
    """Whether the server at `url` is a node of a cluster (CLUSTER INFO answers; a lone server refuses it)."""
    async with Redis.from_url(url, **connection_options(url)) as probe:
        try:
            await probe.execute_command("CLUSTER INFO")
        except ResponseError as exc:
            if isinstance(exc, NoPermissionError):
                raise
            return False  # "ERR This instance has cluster support disabled"
    return True


async def open_redis(settings: Settings, *, max_connections: int = 64, wait: logging.Logger | None = None) -> Redis:
    """The client for INFERQ_REDIS_URL (or the embedded server): redis-py's cluster client if the server is a
    cluster node, else `connect`'s. With `wait` (a worker's log), waits for Redis to answer first."""
    target = await asyncio.to_thread(resolve_url, settings)
    if wait is not None:
        clustered = await retry_outages(lambda: is_cluster_node(target), "waiting for Redis", wait, say_once=True)
    else:
        clustered = await is_cluster_node(target)
    if not clustered:
        return connect(settings, max_connections=max_connections, url=target)
    # Per node, connections are opened as needed (redis-py's cluster client has no blocking pool). Reading the
    # layout fills the startup nodes with every node it finds; _StartupNodes keeps them there.
    cluster = RedisCluster.from_url(target, **connection_options(target))
    cluster.nodes_manager.startup_nodes = _StartupNodes(cluster.nodes_manager.startup_nodes)
    await cluster.initialize()
    return cluster  # type: ignore[return-value] # the commands inferq uses are the same on both


class _StartupNodes(dict[str, ClusterNode]):
    """The nodes a cluster client reads the layout from, kept through connection errors. redis-py 5.3 (the last
    that arq allows) forgets a startup node whenever a command to it fails to connect, and closes every
    connection to read the layout again; the commands that were in flight on live nodes then fail too, and
    forget theirs: a failover could leave it no node to start from. A node is still dropped when the layout
    read from a live one no longer lists it."""

    def pop(self, key: str, *default: Any) -> Any:
        if default:  # the forgetting on a connection error (RedisCluster._execute_command)
            return self.get(key, default[0])
        return super().pop(key)


def is_cluster(redis: Redis) -> TypeGuard[RedisCluster]:
    return _cluster_client(type(redis))


@functools.cache
def _cluster_client(kind: type) -> bool:
    # RedisCluster derives from a typing.Protocol, so an isinstance check of it runs typing's slow __instancecheck__
    # (a few microseconds, where a class check takes a tenth of one); the worker asks once a request or more.
    return issubclass(kind, RedisCluster)


def pipeline(redis: Redis, *, atomic: bool) -> Pipeline:
    """A pipeline; with `atomic`, a MULTI/EXEC transaction where the client has them (not on a cluster)."""
    return redis.pipeline(transaction=atomic and not is_cluster(redis))


# What a cluster node answers while the cluster changes shape (a master died, a failover runs): the client must
# read the cluster's layout again.
_RESHAPED = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError)


async def execute_all(redis: Redis, pipe: Pipeline) -> list[Any]:
    """`pipe.execute(raise_on_error=False)`: one reply or error per command. On a cluster, a node lost or a
    failover met by any command also makes the client read the cluster's layout again before its next command
    (redis-py does so only for a pipeline that raises), so the caller's retry finds the new master."""
    replies = list(await pipe.execute(raise_on_error=False))
    if is_cluster(redis) and any(isinstance(reply, _RESHAPED) for reply in replies):
        await redis.aclose()  # the cluster client's own way: it initializes again on its next command
    return replies


async def node_client(redis: Redis) -> Redis:
    """`redis` itself, or for a cluster a plain client of one of its nodes that answers (tried in random order),
    for what the cluster client lacks: SUBSCRIBE. Raises the last node's error if none answers."""
    if not is_cluster(redis):
        return redis
    nodes = redis.get_nodes()
    error: BaseException = RedisConnectionError("the cluster client knows no node")
    for node in random.sample(nodes, len(nodes)):
        # The node's own options (credentials, TLS, timeouts), less the parser that follows MOVED replies.
        options = {name: value for name, value in node.connection_kwargs.items() if name != "parser_class"}
        client = Redis(connection_pool=ConnectionPool(**options))
        try:
            await client.ping()
            return client
        except OUTAGE as exc:
            error = exc
            await client.aclose()
    await redis.aclose()  # every node it knows is gone: read the layout again on the next command
    raise error

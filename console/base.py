"""What every command shares: exit codes, one-line errors, settings, and running a coroutine.

Exit codes: 0 ok, 1 the request failed, 2 usage error, 3 queue full, 4 timed out, 5 Redis unreachable,
6 Redis refused the user (wrong credentials, or its ACL role may not do that).
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from inferq.shared import aio
from inferq.shared.errors import (
    InferqError,
    PermissionDenied,
    QueueFull,
    RedisUnavailable,
    RequestFailed,
    RequestNotFound,
    RequestTimeout,
)

if TYPE_CHECKING:  # pydantic and the settings load on use: vLLM's spawned processes import the CLI too
    from inferq.shared.settings import Settings

EXIT_FAILED, EXIT_USAGE, EXIT_QUEUE_FULL, EXIT_TIMEOUT, EXIT_UNAVAILABLE, EXIT_DENIED = 1, 2, 3, 4, 5, 6


def die(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def say(message: str) -> None:
    """A line for the person at the terminal (stderr: stdout carries the answer)."""
    typer.echo(message, err=True)


def settings(**overrides: Any) -> Settings:
    """The settings (environment, then the flags that were given); a bad value exits 2 with its name."""
    from inferq.shared.settings import load_settings

    try:
        return load_settings(**overrides)
    except InferqError as exc:
        die(str(exc))


def run(coro: Coroutine[Any, Any, Any], *, sigterm_cancels: bool = True) -> Any:
    """Run a coroutine, turning inferq's errors into their exit codes and a one-line message."""
    try:
        return aio.run(coro, sigterm_cancels=sigterm_cancels)
    except QueueFull as exc:
        die(str(exc), EXIT_QUEUE_FULL)
    except RedisUnavailable as exc:
        die(f"{exc}: is it running, and is INFERQ_REDIS_URL right?", EXIT_UNAVAILABLE)
    except RequestTimeout as exc:
        die(str(exc), EXIT_TIMEOUT)
    except (RequestFailed, RequestNotFound) as exc:
        die(str(exc), EXIT_FAILED)
    except PermissionDenied as exc:
        die(str(exc), EXIT_DENIED)
    except InferqError as exc:
        die(str(exc), EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED)
    except Exception as exc:
        # redis-py loads only for commands that talk to Redis. Its messages name the host and port, never a
        # password.
        from redis.exceptions import AuthenticationError, NoPermissionError

        from inferq.shared.connection import OUTAGE

        if isinstance(exc, AuthenticationError):
            die(f"Redis refused the user in INFERQ_REDIS_URL ({exc}): check its name and password", EXIT_DENIED)
        if isinstance(exc, NoPermissionError):
            die(
                f"this Redis user may not do that ({exc}): status, dead letters and bulk jobs need the ops role "
                "(docs/CONTRACTS.md, \"Roles\")", EXIT_DENIED,
            )  # fmt: skip
        if not isinstance(exc, OUTAGE):
            raise
        die(f"cannot reach Redis ({exc}): is it running, and is INFERQ_REDIS_URL right?", EXIT_UNAVAILABLE)


def model_path(config: Settings) -> str:
    """Where the configured model is on disk, building a known local model first if needed."""
    from inferq.worker.models import resolve_model

    try:
        return str(resolve_model(config.model, config.data_dir, log=say))
    except InferqError as exc:
        die(str(exc))


def pairs(items: list[str]) -> dict[str, Any]:
    """NAME=VALUE options as a dict, each VALUE as JSON where it parses (64, 0.85, true, [1, 2]), else text."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            die(f"{item!r} is not NAME=VALUE")
        try:
            out[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[name.strip()] = raw
    return out


def one_of(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        die(f"unknown {what} {value!r}; use {' or '.join(choices)}")
    return value


def missing_extra(app: typer.Typer, extra: str, module: str | None) -> None:
    """Add `inferq EXTRA ...` as a command that only says how to install the extra it needs."""

    def needs_extra() -> None:
        die(f"`inferq {extra}` needs the {extra} extra ({module} is not installed): pip install 'inferq[{extra}]'")

    settings = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}
    app.command(extra, context_settings=settings, help=f"(not installed: pip install 'inferq[{extra}]')")(needs_extra)

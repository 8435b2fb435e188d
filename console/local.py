"""What lives on this machine: the embedded Redis-compatible server and the locally built models."""

from __future__ import annotations

import os
import time

import typer

from inferq.console.base import EXIT_FAILED, die, one_of, say
from inferq.shared import roles
from inferq.shared.connection import embedded_server
from inferq.shared.errors import ConfigError, InferqError
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings
from inferq.worker.models import KNOWN_MODELS, model_dir, prepare_model


def redis_start(settings: Settings) -> None:
    server = embedded_server(settings)
    try:
        started = server.start()
    except InferqError as exc:
        die(str(exc), EXIT_FAILED)
    typer.echo(f"{'started' if started else 'already running'}: {server.url} (data in {server.dir})")


def redis_stop(settings: Settings) -> None:
    server = embedded_server(settings)
    if server.stop():
        typer.echo("stopped")
    elif server.foreign() is not None:
        die(server.held_elsewhere(), EXIT_FAILED)
    else:
        typer.echo("not running")


def redis_status(settings: Settings) -> None:
    """Whether the embedded server runs, where, with which pid; exit 1 if it does not."""
    server = embedded_server(settings)
    if not server.ping():
        typer.echo(f"not running (would listen on {server.url}, data in {server.dir})")
        raise typer.Exit(1)
    if server.foreign() is not None:
        die(server.held_elsewhere(), EXIT_FAILED)
    typer.echo(f"running: {server.url} pid {server.pid()} (data in {server.dir})")


def redis_acl(settings: Settings, role: str, user: str, tenant: str | None, password_env: str) -> None:
    """Print one ACL-file line for `user` in `role`, its password (from the environment) as a SHA-256."""
    one_of(role, roles.ROLES, "role")
    password = os.environ.get(password_env, "")
    if not password:
        die(f"set {password_env} to the password of user {user!r}: only its SHA-256 is printed")
    try:
        typer.echo(roles.acl_line(user, password, role, Keys.of(settings), tenant))
    except ConfigError as exc:
        die(str(exc))


def models_prepare(settings: Settings, name: str) -> None:
    one_of(name, tuple(KNOWN_MODELS), "model")
    t0 = time.monotonic()
    try:
        path = prepare_model(name, settings.data_dir, log=say)
    except InferqError as exc:
        die(str(exc), EXIT_FAILED)
    typer.echo(f"{name}: {path} ({time.monotonic() - t0:.1f}s)")


def models_list(settings: Settings) -> None:
    for name, about in KNOWN_MODELS.items():
        ready = (model_dir(settings.data_dir, name) / ".complete").exists()
        typer.echo(f"{name:10} {'ready   ' if ready else 'missing '} {about}")

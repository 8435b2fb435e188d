"""Running the gateway: `inferq gateway --host 127.0.0.1 --port 8000` until SIGTERM or Ctrl-C (which
shared.aio.run turns into a cancel, so the server closes its connections and its Redis client on the way out).

A caller that disconnects cancels its request: aiohttp cancels the handler (`handler_cancellation`), and
the handler cancels the queue request on its way out."""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from aiohttp import web

from inferq.gateway.app import GATEWAY, build_app
from inferq.shared.errors import ConfigError
from inferq.shared.settings import Settings

log = logging.getLogger("inferq.gateway")
_SHUTDOWN_GRACE_S = 5.0


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(settings: Settings, host: str, port: int, *, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled. Without API keys, only on a loopback address."""
    app = build_app(settings)
    keys_required = app[GATEWAY].api_keys.required
    if not keys_required and not loopback(host):
        raise ConfigError(
            f"no API keys are set, so the gateway listens on loopback only, not on {host}: set INFERQ_API_KEYS "
            "or INFERQ_API_KEYS_FILE to let callers from elsewhere in, each with a key"
        )
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=_SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        if keys_required:
            log.info("gateway on http://%s:%d (API keys required)", host, port)
        else:
            log.warning("gateway on http://%s:%d with no API keys: anyone who can reach it may use it", host, port)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()

"""A throwaway Redis for a benchmark: benchmarks never touch the user's data."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

from inferq.shared.embedded import EmbeddedServer


def temporary_server() -> EmbeddedServer:
    """A fresh embedded server (AOF on) on a free loopback port in a new temp dir, started. The caller stops
    it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = EmbeddedServer(Path(tempfile.mkdtemp(prefix="inferq-bench-")), port)
    server.start()
    return server

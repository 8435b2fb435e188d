"""A throwaway Redis for a benchmark: benchmarks never touch the user's data."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from inferq.shared.embedded import EmbeddedServer
from inferq.shared.settings import load_settings


class TemporaryServer(EmbeddedServer):
    """An embedded server in a temp dir of its own. Its data goes when it stops (a benchmark's AOF can be
    gigabytes); the dir stays, with any logs a benchmark wrote beside it."""

    def stop(self, timeout_s: float = 15.0) -> bool:
        stopped = super().stop(timeout_s)
        shutil.rmtree(self.dir, ignore_errors=True)
        return stopped


def temporary_server() -> EmbeddedServer:
    """A fresh embedded server (AOF on) on a free loopback port in a new temp dir, started. The caller stops
    it, which removes its data."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    malloc = load_settings().embedded_malloc  # INFERQ_EMBEDDED_MALLOC=libc: the binary's own allocator
    server = TemporaryServer(Path(tempfile.mkdtemp(prefix="inferq-bench-")), port, malloc=malloc)
    server.start()
    return server

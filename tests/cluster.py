"""A real Redis Cluster for the tests: embedded valkey-server nodes on loopback, three masters by default (each
with `replicas` replicas), the slots split evenly as `redis-cli --cluster create` splits them."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import redis as sync_redis

from inferq.shared.embedded import EmbeddedServer

SLOTS = 16384
BUS_OFFSET = 10000  # a node also listens on its port + 10000 (the cluster bus)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(n: int) -> list[int]:
    """`n` ports whose cluster-bus ports (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + BUS_OFFSET < 65536 and port not in ports and _free(port + BUS_OFFSET):
            ports.append(port)
    return ports


class LocalCluster:
    def __init__(self, root: Path, masters: int = 3, replicas: int = 0) -> None:
        ports = cluster_ports(masters * (1 + replicas))
        options = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
        self.nodes = [
            EmbeddedServer(root / f"node-{port}", port, extra=[*options, "--cluster-config-file", "nodes.conf"])
            for port in ports
        ]
        self.masters = self.nodes[:masters]
        self.replicas = self.nodes[masters:]
        self.dead: list[EmbeddedServer] = []

    @property
    def url(self) -> str:
        return self.masters[0].url

    def client(self, node: EmbeddedServer) -> sync_redis.Redis:
        return sync_redis.Redis(port=node.port, socket_timeout=5)

    def start(self, timeout_s: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        for i, node in enumerate(self.masters):
            first, last = i * SLOTS // len(self.masters), (i + 1) * SLOTS // len(self.masters) - 1
            self.client(node).execute_command("CLUSTER ADDSLOTSRANGE", first, last)
        for node in self.nodes[1:]:
            self.client(node).execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
        self._wait(lambda: all(len(self._known(n)) == len(self.nodes) for n in self.nodes), timeout_s, "meet")
        for i, node in enumerate(self.replicas):
            master = self.masters[i % len(self.masters)]
            master_id = self.client(master).execute_command("CLUSTER MYID")
            self.client(node).execute_command("CLUSTER REPLICATE", master_id)
        self._wait(self.ok, timeout_s, "cluster_state:ok")

    def _known(self, node: EmbeddedServer) -> dict[str, dict[str, object]]:
        """address -> what the node knows of it (redis-py parses CLUSTER NODES)."""
        return dict(self.client(node).execute_command("CLUSTER NODES"))

    def kill(self, node: EmbeddedServer) -> None:
        """SIGKILL one node: a crash, nothing flushed."""
        pid = node.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        self.dead.append(node)

    def synced(self) -> bool:
        """Whether every live replica has all its master has written (their replication offsets agree)."""
        offsets = {}
        for node in self.nodes:
            if node in self.dead:
                continue
            info = self.client(node).info("replication")
            offsets[node.port] = (info["role"], info.get("master_repl_offset"), info.get("slave_repl_offset"))
        masters = {port: off for port, (role, off, _) in offsets.items() if role == "master"}
        replicas = [(port, off) for port, (role, _, off) in offsets.items() if role == "slave"]
        return all(off in masters.values() for _, off in replicas) and len(replicas) > 0

    def ok(self) -> bool:
        for node in self.nodes:
            if node in self.dead:
                continue
            try:
                info = self.client(node).execute_command("CLUSTER INFO")
            except sync_redis.RedisError:
                return False
            if info.get("cluster_state") != "ok":
                return False
        return True

    @staticmethod
    def _wait(check, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise TimeoutError(f"the test cluster did not reach {what} within {timeout_s:.0f}s")

    def promoted(self) -> bool:
        """Whether every dead master's slots are served by a live one (a replica took over), seen by all."""
        dead = {f"127.0.0.1:{node.port}" for node in self.dead}
        for node in self.nodes:
            if node in self.dead:
                continue
            known = self._known(node)
            if any(
                known[name].get("slots") and "fail" not in str(known[name]["flags"]) for name in dead if name in known
            ):
                return False
            owners = [info for name, info in known.items() if name not in dead and "master" in str(info["flags"])]
            if sum(len(info.get("slots") or []) for info in owners) < len(self.masters):
                return False
        return self.ok()

    def wait_promoted(self, timeout_s: float = 60.0) -> None:
        self._wait(self.promoted, timeout_s, "a replica serving the dead master's slots")

    def stop(self) -> None:
        for node in self.nodes:
            if node not in self.dead:
                node.stop()

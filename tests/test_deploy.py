"""The deployment file: Redis private and password-protected, the worker given the password, and the file valid
(checked with docker-compose where it is installed; no engine needed)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
PASSWORD_REF = "${INFERQ_REDIS_PASSWORD:?set INFERQ_REDIS_PASSWORD}"  # compose refuses to start without it
LOOPBACK = {"127.0.0.1", "::1", "[::1]"}


def host_ip(port: Any) -> str:
    """The host address a `ports:` entry publishes on ('' for every interface), short or long syntax."""
    if isinstance(port, dict):
        return str(port.get("host_ip") or "")
    parts = str(port).split("/")[0].split(":")  # [[HOST_IP:]HOST_PORT:]CONTAINER_PORT[/PROTOCOL]
    return ":".join(parts[:-2]) if len(parts) > 2 else ""


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def check_services(config: dict[str, Any], password: str) -> None:
    """What a deployment must hold, on the file as written (`password` the variable reference) or as
    docker-compose resolves it (`password` its value)."""
    redis, worker = config["services"]["redis"], config["services"]["worker"]
    for port in redis.get("ports") or []:
        assert host_ip(port) in LOOPBACK, f"Redis is published on every interface: {port!r}; use 127.0.0.1:6379:6379"

    command = redis["command"]
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    assert "--appendonly" in argv and argv[argv.index("--appendonly") + 1] == "yes", argv
    assert "--requirepass" in argv, f"Redis takes connections without a password: {argv}"
    assert argv[argv.index("--requirepass") + 1] == password, argv

    health = redis["healthcheck"]["test"]
    health = " ".join(health) if isinstance(health, list) else str(health)
    authenticates = environment(redis).get("REDISCLI_AUTH") == password or " -a " in health
    assert authenticates, f"the healthcheck does not authenticate: {health}"
    assert "PONG" in health, f"redis-cli exits 0 on NOAUTH too: the healthcheck must look for PONG: {health}"

    assert environment(worker)["INFERQ_REDIS_URL"] == f"redis://:{password}@redis:6379/0"
    # The worker's healthcheck asks its readiness endpoint on the port it serves metrics on (docs/METRICS.md).
    probe = " ".join(worker["healthcheck"]["test"])
    assert f"http://127.0.0.1:{environment(worker)['INFERQ_METRICS_PORT']}/ready" in probe, probe

    gateway = config["services"]["gateway"]
    assert environment(gateway)["INFERQ_REDIS_URL"] == f"redis://:{password}@redis:6379/0"
    assert environment(gateway)["INFERQ_API_KEYS"], "a gateway on every interface without API keys"
    assert "/health" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["build"]["args"]["ENGINE_EXTRA"] == "gateway"  # no engine in the front door


def test_compose_file_keeps_redis_private_and_password_protected() -> None:
    yaml = pytest.importorskip("yaml")
    check_services(yaml.safe_load(COMPOSE.read_text()), PASSWORD_REF)


def compose_config(env_file: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config`, with no .env file and no INFERQ_REDIS_PASSWORD but what `env` gives."""
    base = {k: v for k, v in os.environ.items() if k not in ("INFERQ_REDIS_PASSWORD", "INFERQ_API_KEYS")}
    argv = ["docker-compose", "--env-file", str(env_file), "-f", str(COMPOSE), "config"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**base, **env})


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose not installed (apt-get install docker-compose checks the file offline)",
)
def test_compose_file_is_accepted(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    no_env_file = tmp_path / "empty.env"
    no_env_file.write_text("")

    out = compose_config(no_env_file, INFERQ_REDIS_PASSWORD="s3cret-hex", INFERQ_API_KEYS='{"sk-k": "t"}')
    assert out.returncode == 0, out.stderr
    check_services(yaml.safe_load(out.stdout), "s3cret-hex")
    assert "capabilities:\n            - gpu" in out.stdout or "- gpu" in out.stdout

    unset = compose_config(no_env_file, INFERQ_API_KEYS='{"sk-k": "t"}')
    assert unset.returncode != 0 and "set INFERQ_REDIS_PASSWORD" in unset.stderr, unset.stderr
    no_keys = compose_config(no_env_file, INFERQ_REDIS_PASSWORD="s3cret-hex")
    assert no_keys.returncode != 0 and "set INFERQ_API_KEYS" in no_keys.stderr, no_keys.stderr


def test_the_keda_example_scales_on_every_lane_of_a_model_by_its_lag() -> None:
    """deploy/keda-scaledobject.yaml names inferq's lane streams and group as keys.py formats them."""
    yaml = pytest.importorskip("yaml")
    from inferq.shared.keys import GROUP, Keys

    scaled, auth = list(yaml.safe_load_all((ROOT / "deploy" / "keda-scaledobject.yaml").read_text()))
    assert (scaled["kind"], auth["kind"]) == ("ScaledObject", "TriggerAuthentication")
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    assert [t["metadata"]["stream"] for t in triggers] == Keys("inferq").queues("smollm2")
    assert all(t["metadata"]["consumerGroup"] == GROUP and "lagCount" in t["metadata"] for t in triggers)
    assert all(t["authenticationRef"]["name"] == auth["metadata"]["name"] for t in triggers)

"""`rediss://`: the product over TLS, against a TLS-capable server (Debian's redis-server; the embedded valkey
binary is built without TLS). A throwaway CA and server certificate are made with openssl; the client, the
worker and pub/sub all go through the one URL in INFERQ_REDIS_URL, with the CA given as `ssl_ca_certs` and
`ssl_check_hostname=true` (redis-py 5 checks the chain but not the name unless asked)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as sync_redis

from inferq.producer import InferenceClient
from inferq.producer.local import local_worker
from inferq.shared.schemas import Result
from inferq.shared.settings import Settings
from tests.conftest import free_port

REDIS_SERVER = shutil.which("redis-server")
OPENSSL = shutil.which("openssl")
MODEL = "fake"

pytestmark = [
    pytest.mark.skipif(
        REDIS_SERVER is None,
        reason="TLS needs a redis-server built with TLS on PATH (the embedded valkey has none): "
        "apt-get install redis-server",
    ),
    pytest.mark.skipif(OPENSSL is None, reason="making a test certificate needs openssl: apt-get install openssl"),
]

# Extensions a strict verifier accepts: a real CA, and a server certificate for the loopback address.
OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = inferq test
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


@dataclass
class TlsServer:
    port: int
    ca: Path
    log: Path

    def url(self, scheme: str = "rediss", *, with_ca: bool = True) -> str:
        query = f"?ssl_ca_certs={self.ca}&ssl_check_hostname=true" if with_ca else ""
        return f"{scheme}://127.0.0.1:{self.port}/0{query}"


def make_certificates(d: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key), the server's signed by the CA."""
    config = d / "openssl.cnf"
    config.write_text(OPENSSL_CONFIG)
    ca_key, ca_crt, key, csr, crt = (d / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    commands = [
        ["req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_crt, "-days", "2",
         "-config", config, "-extensions", "ca", "-subj", "/CN=inferq test CA"],
        ["req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-config", config,
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-set_serial", "1", "-days", "2", "-out", crt,
         "-extfile", config, "-extensions", "server"],
    ]  # fmt: skip
    for args in commands:
        out = subprocess.run([str(OPENSSL), *map(str, args)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"openssl {args[0]} failed: {out.stderr}"
    return ca_crt, crt, key


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TlsServer]:
    """redis-server with only a TLS port (no plaintext one), on loopback, no persistence; killed after."""
    ca, crt, key = make_certificates(tmp_path)
    server = TlsServer(free_port(), ca, tmp_path / "redis-server.log")
    argv = [
        str(REDIS_SERVER), "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(server.port),
        "--tls-cert-file", str(crt), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
        "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(tmp_path),
    ]  # fmt: skip
    with open(server.log, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_tls(proc, server)
        yield server
    finally:
        proc.kill()
        proc.wait()


def wait_for_tls(proc: subprocess.Popen[bytes], server: TlsServer, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {proc.returncode}:\n{server.log.read_text()[-3000:]}")
        client = sync_redis.Redis.from_url(server.url(), socket_connect_timeout=1, socket_timeout=2)
        try:
            if client.ping():
                return
        except sync_redis.ConnectionError as exc:
            if time.monotonic() > deadline:
                log = server.log.read_text()
                raise AssertionError(f"redis-server not up over TLS after {timeout_s}s:\n{log}") from exc
            time.sleep(0.05)
        finally:
            client.close()


async def test_submit_to_result_over_tls(
    tls_server: TlsServer, prefix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """INFERQ_REDIS_URL=rediss://...?ssl_ca_certs=CA as a user sets it: the client admits, a worker process
    (started the one way workers are) reads, runs and replies, tokens stream back over pub/sub, the result
    is stored; every hop over TLS, with the server's certificate verified against the CA."""
    url = tls_server.url()
    monkeypatch.setenv("INFERQ_REDIS_URL", url)
    monkeypatch.setenv("INFERQ_KEY_PREFIX", prefix)
    monkeypatch.setenv("INFERQ_DATA_DIR", str(tmp_path / "data"))  # never the embedded server's
    settings = Settings()
    assert settings.redis_url == url

    async with InferenceClient(settings) as client, local_worker(settings, model=MODEL, engine="standin") as worker:
        handle = await client.submit(prompt="hello over tls", model=MODEL, max_tokens=4)

        async def streamed_then_stored() -> tuple[list[str], Result]:
            texts = [event.text async for event in handle.tokens(timeout=60)]
            return texts, await handle.result(timeout=60)

        texts, result = await worker.guard(streamed_then_stored())
        assert "".join(texts) == "t0 t1 t2 t3 "
        assert (result.status, result.text, result.finish_reason) == ("done", "t0 t1 t2 t3 ", "length")
        assert result.usage.completion_tokens == 4
        assert (await client.get(handle.id)).text == "t0 t1 t2 t3 "

        workers = (await client.stats([MODEL]))["models"][MODEL]["workers"]
        assert [w["engine"] for w in workers] == ["standin"], workers  # it registered, over TLS too


def test_the_port_speaks_only_tls(tls_server: TlsServer) -> None:
    """A plaintext client is refused on the TLS port, and TLS without the CA fails verification: the test above
    really ran over verified TLS."""
    for url in (tls_server.url("redis", with_ca=False), tls_server.url(with_ca=False)):
        plain = sync_redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        with pytest.raises((sync_redis.ConnectionError, sync_redis.TimeoutError)):
            plain.ping()
        plain.close()
    verified = sync_redis.Redis.from_url(tls_server.url(), socket_timeout=2)
    assert verified.ping()
    verified.close()

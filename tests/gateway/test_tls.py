"""gateway.tls: HTTPS listeners with a certificate made by the test's own CA
(`trustme`): the config checks, the handshake and ALPN, the header deadline
and the connection cap kept over TLS (on `gateway.server`, in process), then
a real `dialgate serve` over HTTPS driven by Mixpanel's Python SDK with
`api_host`, and a renewed certificate taken on SIGHUP."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from gateway.config import ConfigError, Settings
from tests.support import ADMIN, free_port, own_server, settings_for

DIALGATE = Path(sys.executable).parent / "dialgate"
TRACK = {"event": "E", "properties": {"distinct_id": "u"}}


class Files:
    """A CA (its PEM at `ca`) and a certificate for 127.0.0.1 and localhost."""

    def __init__(self, tmp_path: Path) -> None:
        self.authority = trustme.CA()
        self.ca = tmp_path / "ca.pem"
        self.authority.cert_pem.write_to_path(str(self.ca))
        self.cert, self.key = tmp_path / "cert.pem", tmp_path / "key.pem"
        self.issue()

    def issue(self, cert: Path | None = None, key: Path | None = None) -> trustme.LeafCert:
        leaf = self.authority.issue_cert("127.0.0.1", "localhost")
        (cert or self.cert).write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key or self.key))
        return leaf

    def client_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if alpn:
            context.set_alpn_protocols(alpn)
        return context


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def _settings(backend: dict[str, str], files: Files, **server: Any) -> Settings:
    return settings_for(backend, server={"bind": f"127.0.0.1:{free_port()}", "certfile": str(files.cert),
                                         "keyfile": str(files.key), **server})


@pytest.fixture
def https(sqlite_backend: dict[str, str], files: Files) -> Iterator[str]:
    with own_server(_settings(sqlite_backend, files, read_timeout=2, max_connections=2)) as urls:
        yield urls["public"]


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("://")[1].rsplit(":", 1)
    return host, int(port)


# -- the config checks ---------------------------------------------------------


def _refused(backend: dict[str, str], **sections: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_for(backend, **sections)
    return str(caught.value)


def test_a_certificate_and_its_key_both_or_neither_readable_and_matching(
        sqlite_backend: dict[str, str], files: Files, tmp_path: Path) -> None:
    cert, key = str(files.cert), str(files.key)
    assert _refused(sqlite_backend, server={"certfile": cert}) == (
        "server.certfile, server.keyfile: give both (HTTPS) or neither (plain HTTP)")
    assert _refused(sqlite_backend, server={"certfile": cert, "keyfile": str(tmp_path / "nope.pem")}) == (
        f"server.keyfile: cannot read {tmp_path / 'nope.pem'}: No such file or directory")
    other_cert, other_key = tmp_path / "other.pem", tmp_path / "other.key"
    files.issue(other_cert, other_key)
    assert _refused(sqlite_backend, server={"certfile": cert, "keyfile": str(other_key)}) == (
        f"server.keyfile: {other_key} is not the key of the certificate in {cert}")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    message = _refused(sqlite_backend, server={"certfile": str(tmp_path / "junk.pem"), "keyfile": key})
    assert message.startswith(f"server.certfile: cannot load {tmp_path / 'junk.pem'} (key {key}) as a PEM"), message
    # A passphrase would have to be typed at every start: refused, never prompted for.
    private = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.BestAvailableEncryption(b"secret")))
    assert _refused(sqlite_backend, server={"certfile": cert, "keyfile": str(locked)}) == (
        f"server.keyfile: {locked} is encrypted with a passphrase; give an unencrypted key")
    # The admin listener: a pair of its own, only with a listener of its own.
    assert _refused(sqlite_backend, admin={"keys": ["k"], "certfile": cert, "keyfile": key}).startswith(
        "admin.certfile: only for a listener of its own (admin.bind)")
    assert _refused(sqlite_backend, admin={"keys": ["k"], "bind": "127.0.0.1:9", "keyfile": key}) == (
        "admin.certfile, admin.keyfile: give both (HTTPS) or neither (plain HTTP)")
    # Both, readable and matching: fine.
    settings_for(sqlite_backend, server={"certfile": cert, "keyfile": key})


# -- over TLS, on the gateway's own server ---------------------------------------


def test_a_request_over_https_is_answered_and_stored(https: str, files: Files) -> None:
    with httpx.Client(base_url=https, verify=files.client_context(), timeout=10) as client:
        reply = client.post("/track", headers={"X-Cohorly-Token": "tok_shop"}, json=TRACK)
        assert (reply.status_code, reply.json()) == (200, {"status": 1, "inserted": 1})
        assert reply.http_version == "HTTP/1.1"
        events = client.get("/admin/v1/projects/shop/events", headers=ADMIN).json()["events"]
        assert [e["name"] for e in events] == ["E"]


def test_alpn_offers_http_1_1_only_and_h2_only_with_h2c(
        https: str, files: Files, sqlite_backend: dict[str, str]) -> None:
    host, port = _address(https)
    with socket.create_connection((host, port), timeout=5) as raw, \
            files.client_context(["h2", "http/1.1"]).wrap_socket(raw, server_hostname=host) as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
    # A client that offers h2 alone gets no protocol chosen, and its HTTP/2
    # preface the answer of a cleartext one: GOAWAY HTTP_1_1_REQUIRED.
    with socket.create_connection((host, port), timeout=5) as raw, \
            files.client_context(["h2"]).wrap_socket(raw, server_hostname=host) as tls:
        assert tls.selected_alpn_protocol() is None
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert tls.recv(65536) == bytes.fromhex("000008070000000000" "000000000000000d")
    with own_server(_settings(sqlite_backend, files, h2c=True)) as urls, \
            httpx.Client(base_url=urls["public"], verify=files.client_context(), http2=True, timeout=10) as client:
        reply = client.post("/track", headers={"X-Cohorly-Token": "tok_shop"}, json=TRACK)
        assert reply.http_version == "HTTP/2" and reply.status_code == 200, reply.text


def test_plain_http_on_an_https_listener_gets_no_answer(https: str) -> None:
    with socket.create_connection(_address(https), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        assert b"HTTP/1.1" not in received and b"ok" not in received


def _closed_after(sock: socket.socket | ssl.SSLSocket, limit: float) -> float:
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    return time.monotonic() - started


def test_the_handshake_and_the_headers_share_the_header_deadline(https: str, files: Files) -> None:
    # read_timeout = 2: a connection that never starts its handshake ...
    with socket.create_connection(_address(https), timeout=5) as idle:
        assert 1.5 < _closed_after(idle, 6) < 4
    # ... and one that takes 1.2 s to start it, then trickles its headers:
    # closed 2 s after the accept, not 2 s after the handshake.
    host, port = _address(https)
    raw = socket.create_connection((host, port), timeout=5)
    accepted = time.monotonic()
    time.sleep(1.2)
    with files.client_context().wrap_socket(raw, server_hostname=host) as slow:
        slow.sendall(b"POST /track HTTP/1.1\r\nHost: x\r\n")
        _closed_after(slow, 6)
    assert 1.8 < time.monotonic() - accepted < 3.5


def test_the_connection_cap_holds_over_tls(https: str, files: Files) -> None:
    # max_connections = 2: two open TLS connections, the third waits in the
    # backlog with its handshake unanswered until one of them closes.
    host, port = _address(https)
    context = files.client_context()
    held = [context.wrap_socket(socket.create_connection((host, port), timeout=5), server_hostname=host)
            for _ in range(2)]
    waiting = socket.create_connection((host, port), timeout=0.8)
    with pytest.raises(TimeoutError):
        context.wrap_socket(waiting, server_hostname=host)
    waiting.close()
    # The cap also outlasts handshakes never finished: the first two go on.
    for sock in held:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    held.pop().close()
    with context.wrap_socket(socket.create_connection((host, port), timeout=5), server_hostname=host) as third:
        third.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert third.recv(65536).startswith(b"HTTP/1.1 200")
    held[0].close()


# -- a real `dialgate serve` over HTTPS, the Mixpanel SDK's api_host ------------

SDK_SCRIPT = textwrap.dedent("""
    import sys
    from mixpanel import Consumer, Mixpanel

    mp = Mixpanel("mp_tls", consumer=Consumer(api_host=sys.argv[1], retry_limit=0))
    mp.track("user-1", "Signed Up", {"plan": "pro"})
    mp.people_set("user-1", {"name": "Ada"})
    mp.import_data(None, "user-1", "Old Purchase", 1600000000, api_secret="mps_tls")
    print("sent")
""")


def _config(tmp_path: Path, files: Files, port: int, admin_port: int) -> Path:
    config = tmp_path / "dialgate.toml"
    config.write_text(f"""
[server]
bind = "127.0.0.1:{port}"
certfile = "{files.cert}"
keyfile = "{files.key}"

[storage]
url = "sqlite+aiosqlite:///{tmp_path / 'tls.db'}"

[admin]
keys = ["adm_tls"]
bind = "127.0.0.1:{admin_port}"
certfile = "{files.cert}"
keyfile = "{files.key}"

[[projects]]
name = "shop"
mixpanel_tokens = ["mp_tls"]
mixpanel_secrets = ["mps_tls"]
""", encoding="utf-8")
    return config


def _serial(host: str, port: int, context: ssl.SSLContext) -> int:
    with socket.create_connection((host, port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return int(x509.load_der_x509_certificate(der).serial_number)


def test_dialgate_serve_over_https_with_the_mixpanel_sdk_and_a_renewed_certificate(
        tmp_path: Path, files: Files) -> None:
    port, admin_port = free_port(), free_port()
    config = _config(tmp_path, files, port, admin_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALGATE_", "REQUESTS_CA", "CURL_CA", "SSL_"))}
    log = tmp_path / "err.log"
    with log.open("wb") as err:
        process = subprocess.Popen([str(DIALGATE), "serve", "--config", str(config)], cwd=tmp_path, env=env,
                                   stdout=subprocess.DEVNULL, stderr=err)
    public, admin = f"https://127.0.0.1:{port}", f"https://127.0.0.1:{admin_port}"
    context = files.client_context()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(public + "/healthz", verify=context, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        # The SDK's own `https://{api_host}`, the test CA trusted through
        # requests' REQUESTS_CA_BUNDLE (the SDK passes verify=True, which
        # requests replaces with that bundle).
        sdk = subprocess.run([sys.executable, "-c", SDK_SCRIPT, f"127.0.0.1:{port}"], capture_output=True,
                             text=True, timeout=60, env={**env, "REQUESTS_CA_BUNDLE": str(files.ca)})
        assert sdk.returncode == 0 and sdk.stdout.strip() == "sent", sdk.stderr
        # Without the CA the SDK refuses the certificate: it is really checked.
        untrusted = subprocess.run([sys.executable, "-c", SDK_SCRIPT, f"127.0.0.1:{port}"], capture_output=True,
                                   text=True, timeout=60, env=env)
        assert untrusted.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        with httpx.Client(base_url=admin, verify=context, headers={"Authorization": "Bearer adm_tls"},
                          timeout=10) as client:
            events = client.get("/admin/v1/projects/shop/events").json()["events"]
            assert sorted(e["name"] for e in events) == ["Old Purchase", "Signed Up"]
            profile = client.get("/admin/v1/projects/shop/profiles/user-1").json()
            assert profile["properties"]["name"] == "Ada"
            assert client.get("/metrics").status_code == 200
        # A renewed certificate at the same paths: taken on SIGHUP by the
        # next handshakes, on both listeners.
        before = _serial("127.0.0.1", port, context)
        renewed = files.issue()
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "configuration reloaded" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        after = _serial("127.0.0.1", port, context)
        assert after != before
        from cryptography import x509

        assert after == x509.load_pem_x509_certificate(renewed.cert_chain_pems[0].bytes()).serial_number
        assert _serial("127.0.0.1", admin_port, context) == after
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert f"serving on https://127.0.0.1:{port}, admin on https://127.0.0.1:{admin_port}" in text, text
    assert "Traceback" not in text, text

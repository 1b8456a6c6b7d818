"""TLS for a listener: the server context hypercorn builds (TLS 1.2 at
least, its cipher list, no compression), with the certificate and key of
the config and the ALPN protocols the listener speaks: `h2` and
`http/1.1` with `server.h2c` on, else `http/1.1` alone (a client that
offers only h2 then gets no protocol chosen, and its HTTP/2 preface the
answer it gets in cleartext: GOAWAY HTTP_1_1_REQUIRED).

`problem` says why a pair cannot be served, for the config checks, so
`check-config` refuses what `serve` could not load."""

from __future__ import annotations

import ssl

from hypercorn.config import Config


class Certificate:
    """A listener's TLS context. On a reload the files are read again into
    a new context (`fresh`), then `context` is replaced: handshakes from
    then on present the new certificate, open connections keep theirs."""

    def __init__(self, certfile: str, keyfile: str, *, http2: bool) -> None:
        self.certfile, self.keyfile, self.http2 = certfile, keyfile, http2
        self.context = self.fresh()

    def fresh(self) -> ssl.SSLContext:
        """Raises ssl.SSLError or OSError."""
        return context(self.certfile, self.keyfile, http2=self.http2)


def certificate(certfile: str, keyfile: str, *, http2: bool) -> Certificate | None:
    """A listener's certificate, or None for plain HTTP (checked settings:
    both files or neither)."""
    return Certificate(certfile, keyfile, http2=http2) if certfile else None


def scheme(tls: Certificate | None) -> str:
    return "http" if tls is None else "https"


def context(certfile: str, keyfile: str, *, http2: bool) -> ssl.SSLContext:
    config = Config()
    config.certfile, config.keyfile = certfile, keyfile
    config.alpn_protocols = ["h2", "http/1.1"] if http2 else ["http/1.1"]
    built = config.create_ssl_context()
    assert built is not None  # certfile and keyfile are set
    return built


class _Encrypted(Exception):
    pass


def _no_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal.
    raise _Encrypted


def problem(certfile: str, keyfile: str) -> str | None:
    """What stops the pair from being served, phrased for an operator
    (None: it loads)."""
    for name, path in (("certfile", certfile), ("keyfile", keyfile)):
        try:
            with open(path, "rb") as file:
                file.read(1)
        except OSError as exc:
            return f"{name}: cannot read {path}: {exc.strerror or exc}"
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.load_cert_chain(certfile, keyfile, password=_no_passphrase)
    except _Encrypted:
        return f"keyfile: {keyfile} is encrypted with a passphrase; give an unencrypted key"
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason:
            return f"keyfile: {keyfile} is not the key of the certificate in {certfile}"
        return f"certfile: cannot load {certfile} (key {keyfile}) as a PEM certificate chain and key: {reason}"
    return None

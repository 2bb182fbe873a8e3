"""TLS from the secret alone: the server's own certificate, clients that need no CA, and
one port that speaks both TLS and plain TCP.

* The server makes an EC key and a self-signed certificate on first start and keeps them
  (mode 0600) in its config directory, ``~/.config/achilles/server-tls.pem``; a user
  with a PKI passes ``--tls-cert/--tls-key`` instead.
* A client does not check the certificate against a CA (there is none): it reads the
  SHA-256 fingerprint of the certificate it was shown and puts it in the handshake's
  transcript (:mod:`achilles.protocol.auth`). A man in the middle who shows its own
  certificate is found out by the HMAC, which it cannot make without the secret. With
  ``--tls-ca`` the client also verifies the chain and the host name.
* The listening port looks at a connection's first byte: a TLS record (0x16) is
  handed to TLS, a ``{`` (our Hello frame) to plain TCP, which is accepted from
  loopback peers, and from others only where the server was told to (with a warning).
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
from typing import Any

from twisted.internet import protocol

from achilles.config import is_loopback
from achilles.errors import ConfigError
from achilles.protocol import auth

log = logging.getLogger("achilles.server")

CERT_FILE = "server-tls.pem"
#: first byte of a TLS handshake record
TLS_RECORD = 0x16


def _new_certificate() -> bytes:
    """A fresh EC P-256 key and a self-signed certificate for it, as PEM (key first)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "achilles server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) + cert.public_bytes(serialization.Encoding.PEM)


def _own_certificate(config_dir: str) -> bytes:
    """The server's kept key and certificate, made on first use (published atomically:
    servers starting together all end up with the same one). Refused if another user
    could have planted or read it (not ours, or readable by others); if the directory
    cannot be written, a fresh one for this run only."""
    path = os.path.join(config_dir, CERT_FILE)
    for _ in range(2):
        try:
            return _read_private(path)
        except FileNotFoundError:
            pass
        pem = _new_certificate()
        try:
            os.makedirs(config_dir, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=config_dir, prefix=".server-tls-")
        except OSError as exc:
            log.warning(
                "cannot keep the server's TLS certificate in %s (%s); using a new one for this run",
                config_dir,
                exc.strerror,
            )
            return pem
        try:
            with os.fdopen(fd, "wb") as f:  # mkstemp made it 0600
                f.write(pem)
            os.link(tmp, path)  # fails if another server published one first
            log.info("made the server's TLS key and certificate: %s", path)
            return pem
        except FileExistsError:
            continue  # read theirs
        finally:
            os.unlink(tmp)
    return _read_private(path)


def _read_private(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ConfigError(
                f"{path} must belong to this user and be private (mode 0600): "
                f"it holds the server's TLS key"
            )
        return f.read()


class ServerTLS:
    """The server's certificate, its fingerprint (the channel binding) and TLS options."""

    def __init__(self, settings: Any, config_dir: str) -> None:
        from twisted.internet import ssl  # pyOpenSSL: loaded only where TLS is used

        if settings.tls_cert and settings.tls_key:
            with open(settings.tls_cert, "rb") as c, open(settings.tls_key, "rb") as k:
                pem = c.read() + b"\n" + k.read()
        else:
            pem = _own_certificate(config_dir)
        self.certificate = ssl.PrivateCertificate.loadPEM(pem)
        from cryptography.hazmat.primitives.serialization import Encoding

        der = self.certificate.original.to_cryptography().public_bytes(Encoding.DER)
        self.fingerprint = auth.fingerprint(der)
        self.options = self.certificate.options()


def peer_fingerprint(transport: Any) -> str:
    """The fingerprint of the certificate the server showed this client; "" on plain
    TCP (or in memory)."""
    get = getattr(transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    if cert is None:
        return ""
    from cryptography.hazmat.primitives.serialization import Encoding

    return auth.fingerprint(cert.to_cryptography().public_bytes(Encoding.DER))


def client_options(settings: Any) -> Any:
    """TLS options for a client: verify against ``tls_ca`` if given (chain and host
    name), else no CA: the handshake's channel binding authenticates the server."""
    from twisted.internet import ssl

    if settings.tls_ca:
        with open(settings.tls_ca, "rb") as f:
            ca = ssl.Certificate.loadPEM(f.read())
        return ssl.optionsForClientTLS(settings.host, trustRoot=ca)
    return ssl.CertificateOptions(verify=False)


class _Sniffer(protocol.Protocol):
    """Reads a connection's first byte, then hands the connection to TLS or plain TCP."""

    transport: Any  # a TCP transport (Twisted types it ITransport | None)

    def __init__(self, factory: UnifiedFactory, addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        self._timer: Any = None
        self._waiting = False  # counted in factory.pending until handed over

    def connectionMade(self) -> None:
        f = self.factory
        f.pending += 1
        self._waiting = True
        if f.pending > f.limit:
            log.warning(
                "too many connections that have not spoken yet; dropping %s",
                getattr(self.addr, "host", "?"),
            )
            self.transport.abortConnection()
            return
        self._timer = f.clock.callLater(f.timeout, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        f = self.factory
        host = getattr(self.addr, "host", "")
        tls = data[0] == TLS_RECORD
        inner = (f.tls if tls else f.plain).buildProtocol(self.addr)
        server_proto = inner.wrappedProtocol if tls else inner
        server_proto.binding = f.fingerprint if tls else ""
        if not tls and not (f.allow_plain or (f.allow_plain_loopback and is_loopback(host))):
            server_proto.plain_refusal = (
                "this server accepts only TLS from this peer's address: set ACHILLES_TLS "
                "to auto or on (or leave it unset) on the peer"
            )
        self._handed_over()
        self.transport.protocol = inner
        inner.makeConnection(self.transport)
        inner.dataReceived(data)

    def _handed_over(self) -> None:
        if self._waiting:
            self._waiting = False
            self.factory.pending -= 1
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Any = None) -> None:
        self._handed_over()  # it never spoke


class UnifiedFactory(protocol.Factory):
    """One listening port for TLS and plain connections to the server's factory."""

    def __init__(
        self,
        server_factory: Any,
        tls: ServerTLS,
        allow_plain: bool,
        clock: Any,
        timeout: float,
        limit: int,
    ) -> None:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        self.plain = server_factory
        self.tls = TLSMemoryBIOFactory(tls.options, False, server_factory)
        self.fingerprint = tls.fingerprint
        self.allow_plain = allow_plain  # from anyone (--tls off)
        self.allow_plain_loopback = True  # from this machine (not with --tls on)
        self.clock = clock
        self.timeout = timeout
        self.limit = limit
        self.pending = 0

    def startFactory(self) -> None:
        """The listening port starts this factory, not the server's: pass it on (the
        server's factory runs its heartbeat ticker while started)."""
        self.plain.doStart()

    def stopFactory(self) -> None:
        self.plain.doStop()

    def buildProtocol(self, addr: Any) -> _Sniffer:
        return _Sniffer(self, addr)

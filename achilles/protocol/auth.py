"""Mutual HMAC challenge-response, in pure functions.

    server                                   peer (node, controller, admin)
      |-- Challenge(nonce_s, version, py) ---->|
      |<-- AuthReply(role, nonce_p, digest_p) -|
      |-- Welcome(digest_s, id) -------------->|

    digest_p = HMAC(secret, "achilles-peer"|nonce_s|nonce_p|role|user)
    digest_s = HMAC(secret, "achilles-server"|nonce_p|nonce_s)

The secret never crosses the wire; each side binds its proof to the other's fresh nonce,
so a recorded exchange cannot be replayed; comparisons are constant-time. As in
``multiprocessing.connection``'s authkey handshake, nothing is unpickled before it ends.
"""
from __future__ import annotations

import hashlib
import hmac

from achilles.errors import AuthenticationError, VersionMismatchError
from achilles.protocol.messages import PROTOCOL_VERSION

NONCE_BYTES = 32


def make_nonce(rand: bytes) -> str:
    """Hex nonce from caller-supplied randomness (``os.urandom(NONCE_BYTES)``)."""
    if len(rand) < 16:
        raise ValueError("a nonce needs at least 16 random bytes")
    return rand.hex()


def _mac(secret: str, *parts: str) -> str:
    msg = "|".join(parts).encode("utf-8")
    return hmac.new(secret.encode("utf-8"), msg, hashlib.sha256).hexdigest()


def peer_digest(secret: str, server_nonce: str, peer_nonce: str, role: str,
                username: str) -> str:
    """The peer's proof, bound to the server's nonce and to the role it claims."""
    return _mac(secret, "achilles-peer", server_nonce, peer_nonce, role, username)


def server_digest(secret: str, server_nonce: str, peer_nonce: str) -> str:
    """The server's proof, bound to the peer's nonce."""
    return _mac(secret, "achilles-server", peer_nonce, server_nonce)


def verify(expected: str, got: str, who: str) -> None:
    """Raise AuthenticationError unless the digests match (constant time)."""
    if not hmac.compare_digest(expected.encode("ascii", "replace"),
                               got.encode("ascii", "replace")):
        raise AuthenticationError(
            f"{who} failed authentication: wrong secret key (ACHILLES_SECRET_KEY)")


def check_versions(remote_version: int, remote_python: str, local_python: str,
                   remote_desc: str) -> None:
    """Refuse a peer whose protocol or Python major.minor differs from ours.

    dill ships bytecode, which only loads on the same Python major.minor.
    """
    if remote_version != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"protocol version mismatch: {remote_desc} speaks achilles protocol "
            f"{remote_version}, this side speaks {PROTOCOL_VERSION}")
    if remote_python != local_python:
        raise VersionMismatchError(
            f"Python version mismatch: {remote_desc} runs Python {remote_python}, "
            f"this side runs Python {local_python}; dill-serialised functions only load "
            f"on the same major.minor")

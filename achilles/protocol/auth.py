"""Mutual HMAC challenge-response, bound to the TLS session, in pure functions.

    peer (node, controller, admin)                server
      |-- Hello ------------------------------------>|   (the peer speaks first)
      |<-- Challenge(nonce_s, version, python) ------|
      |-- AuthReply(role, user, name, nonce_p, digest_p, version, python, slots) -->|
      |<-- Welcome(digest_s, id)  or  ErrorFrame(code, detail, proof) ------------|

Both proofs are HMAC-SHA256 under the shared secret of one *transcript*: a canonical
JSON array (unambiguous: no choice of field values can make two transcripts encode
alike) of a label saying who proves, both nonces, the role, username and name the peer
claims, the protocol version, both Python versions, and the *channel binding*: the
SHA-256 fingerprint of the server's TLS certificate as this side saw it ("" on plain
TCP). So

* the secret never crosses the wire; each proof covers the other side's fresh nonce, so
  a recorded exchange cannot be replayed;
* a man in the middle who relays the handshake cannot change the role or username (they
  are in the transcript, which has no separators to smuggle fields through), and one
  who terminates TLS with a certificate of its own is caught: the fingerprint the peer
  saw is not the server's, so neither proof verifies on the other side;
* a refusal after the peer's AuthReply carries a proof too, so that only a server that
  knows the secret can make a node give up for good (anything else is retried).

Nonces are 64 lowercase hex characters, usernames and names a short safe alphabet;
both sides check what the other sent before using it. As in
``multiprocessing.connection``'s authkey handshake, nothing is unpickled before it ends.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections import Counter
from dataclasses import dataclass

from achilles.errors import AuthenticationError, ProtocolError, VersionMismatchError
from achilles.protocol.messages import PROTOCOL_VERSION

NONCE_BYTES = 32
_NONCE = re.compile(r"[0-9a-f]{%d}" % (2 * NONCE_BYTES))
#: usernames and node names: letters, digits and ``._@:+-``, 1 to 64 characters, starting
#: with a letter or digit (no spaces, quotes, control characters or escapes to forge
#: log lines or a terminal's display with)
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,63}"
_NAME = re.compile(NAME_PATTERN)
_SESSION = re.compile(r"[0-9a-f]{32,64}")
#: the label that starts every transcript (a new format gets a new label)
_LABEL = "achilles-auth-4"


def make_nonce(rand: bytes) -> str:
    """Hex nonce from caller-supplied randomness (``os.urandom(NONCE_BYTES)``)."""
    if len(rand) != NONCE_BYTES:
        raise ValueError(f"a nonce needs exactly {NONCE_BYTES} random bytes")
    return rand.hex()


def check_nonce(nonce: str, whose: str) -> None:
    """Raise ProtocolError unless ``nonce`` is exactly what :func:`make_nonce` makes."""
    if not _NONCE.fullmatch(nonce):
        raise ProtocolError(
            "bad-nonce", f"{whose} nonce is not {2 * NONCE_BYTES} lowercase hex characters"
        )


def make_session(rand: bytes) -> str:
    """A client's session token from caller-supplied randomness (16 bytes or more)."""
    if len(rand) < 16:
        raise ValueError("a session token needs at least 16 random bytes")
    return rand[:32].hex()


def check_session(token: str) -> None:
    """Raise ProtocolError unless ``token`` is 32 to 64 lowercase hex characters."""
    if not _SESSION.fullmatch(token):
        raise ProtocolError(
            "bad-session", "the session token is not 32-64 lowercase hex characters"
        )


def check_name(text: str, what: str) -> None:
    """Raise ProtocolError unless ``text`` is a safe username or node name."""
    if not _NAME.fullmatch(text):
        raise ProtocolError(
            "bad-name",
            f"{what} must be 1-64 letters, digits or ._@:+- (starting with a letter or digit)",
        )


def safe_name(text: str) -> str:
    """``text`` cut down to a valid name (for a default such as the host name)."""
    kept = re.sub(r"[^A-Za-z0-9._@:+-]", "-", text).lstrip("._@:+-")[:64]
    return kept or "node"


@dataclass(frozen=True)
class Transcript:
    """What both proofs of one handshake cover (see the module docstring)."""

    server_nonce: str
    peer_nonce: str
    role: str
    username: str
    name: str
    version: int  # the protocol version the peer speaks
    peer_python: str
    server_python: str
    binding: str  # the server certificate's SHA-256 fingerprint, hex; "" on plain TCP
    session: str = ""  # the client's session token (see messages.AuthReply)

    def encode(self, who: str, *extra: str | int) -> bytes:
        fields = [
            _LABEL,
            who,
            self.server_nonce,
            self.peer_nonce,
            self.role,
            self.username,
            self.name,
            self.version,
            self.peer_python,
            self.server_python,
            self.binding,
            self.session,
            *extra,
        ]
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _mac(secret: str, data: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), data, hashlib.sha256).hexdigest()


def peer_digest(secret: str, t: Transcript) -> str:
    """The peer's proof."""
    return _mac(secret, t.encode("peer"))


def server_digest(secret: str, t: Transcript, peer_id: int) -> str:
    """The server's proof, which also covers the id it gives the peer."""
    return _mac(secret, t.encode("server", peer_id))


def refusal_digest(secret: str, t: Transcript, code: str) -> str:
    """The server's proof on a refusal: only the secret's holder can make it final."""
    return _mac(secret, t.encode("refusal", code))


def verify(expected: str, got: str, who: str) -> None:
    """Raise AuthenticationError unless the digests match (constant time)."""
    if not hmac.compare_digest(expected.encode("ascii", "replace"), got.encode("ascii", "replace")):
        raise AuthenticationError(
            f"{who} failed authentication: wrong secret key (ACHILLES_SECRET_KEY), or a "
            f"man in the middle"
        )


def fingerprint(der: bytes) -> str:
    """The channel binding of a certificate: SHA-256 of its DER encoding, hex."""
    return hashlib.sha256(der).hexdigest()


def check_versions(
    remote_version: int, remote_python: str, local_python: str, remote_desc: str
) -> None:
    """Refuse a peer whose protocol or Python major.minor differs from ours.

    dill ships bytecode, which only loads on the same Python major.minor.
    """
    if remote_version != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"protocol version mismatch: {remote_desc} speaks achilles protocol "
            f"{remote_version}, this side speaks {PROTOCOL_VERSION}"
        )
    if remote_python != local_python:
        raise VersionMismatchError(
            f"Python version mismatch: {remote_desc} runs Python {remote_python}, "
            f"this side runs Python {local_python}; dill-serialised functions only load "
            f"on the same major.minor"
        )


#: below this many bits of estimated entropy the server warns about its secret
WEAK_SECRET_BITS = 80


def secret_bits(secret: str) -> float:
    """A rough, conservative estimate of the entropy of a secret: its length times the
    Shannon entropy of its own characters (a repeated or short secret scores low; a
    ``secrets.token_urlsafe(32)`` scores about 200)."""
    if not secret:
        return 0.0
    counts = Counter(secret)
    n = len(secret)
    per_char = -sum(c / n * math.log2(c / n) for c in counts.values())
    return n * per_char

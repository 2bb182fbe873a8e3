"""HMAC challenge-response: good and bad secrets, replays, bound identities, versions."""
from __future__ import annotations

import hashlib
import hmac

import pytest

from achilles.errors import AuthenticationError, VersionMismatchError
from achilles.protocol.auth import (
    NONCE_BYTES,
    check_versions,
    make_nonce,
    peer_digest,
    server_digest,
    verify,
)
from achilles.protocol.messages import PROTOCOL_VERSION

SECRET = "correct horse battery staple"
SERVER_NONCE = make_nonce(bytes(range(NONCE_BYTES)))
PEER_NONCE = make_nonce(bytes(range(100, 100 + NONCE_BYTES)))


def peer_proof(secret: str = SECRET, server_nonce: str = SERVER_NONCE,
               role: str = "node", username: str = "achilles") -> str:
    return peer_digest(secret, server_nonce, PEER_NONCE, role, username)


def _hmac(*parts: str) -> str:
    """The transcript's HMAC-SHA256, computed here independently of the code under test."""
    return hmac.new(SECRET.encode(), "|".join(parts).encode(), hashlib.sha256).hexdigest()


def test_good_secret_verifies_both_ways() -> None:
    """Each side's proof is the HMAC of the documented transcript under the secret, and
    the other side, holding the same secret, accepts it."""
    peer = _hmac("achilles-peer", SERVER_NONCE, PEER_NONCE, "node", "achilles")
    server = _hmac("achilles-server", PEER_NONCE, SERVER_NONCE)
    assert peer_proof() == peer and server_digest(SECRET, SERVER_NONCE, PEER_NONCE) == server
    verify(peer, peer_proof(), "node")  # the server checks the peer
    verify(server, server_digest(SECRET, SERVER_NONCE, PEER_NONCE), "server")  # and back


def test_wrong_secret_fails_on_server_side() -> None:
    """A peer holding another secret is refused with an error naming the secret setting."""
    with pytest.raises(AuthenticationError, match="ACHILLES_SECRET_KEY") as info:
        verify(peer_proof(SECRET), peer_proof("wrong"), "node n1")
    assert "node n1" in str(info.value)


def test_wrong_secret_fails_on_peer_side() -> None:
    """A server holding another secret is refused by the peer."""
    with pytest.raises(AuthenticationError):
        verify(server_digest(SECRET, SERVER_NONCE, PEER_NONCE),
               server_digest("wrong", SERVER_NONCE, PEER_NONCE), "server")


def test_digest_for_one_server_nonce_does_not_verify_for_another() -> None:
    """A recorded peer proof replayed against a fresh server nonce is refused."""
    other_nonce = make_nonce(b"\x07" * NONCE_BYTES)
    recorded = peer_proof(server_nonce=SERVER_NONCE)
    with pytest.raises(AuthenticationError):
        verify(peer_proof(server_nonce=other_nonce), recorded, "node")


def test_server_proof_is_bound_to_peer_nonce() -> None:
    """A recorded server proof does not verify for a peer that sent a different nonce."""
    recorded = server_digest(SECRET, SERVER_NONCE, PEER_NONCE)
    other_peer_nonce = make_nonce(b"\x09" * NONCE_BYTES)
    with pytest.raises(AuthenticationError):
        verify(server_digest(SECRET, SERVER_NONCE, other_peer_nonce), recorded, "server")


def test_server_and_peer_proofs_differ() -> None:
    """The server's proof cannot be reflected as a peer's proof for the same nonces."""
    assert server_digest(SECRET, SERVER_NONCE, PEER_NONCE) not in {
        peer_proof(role=role) for role in ("node", "controller", "admin")}
    assert server_digest(SECRET, SERVER_NONCE, PEER_NONCE) != server_digest(
        SECRET, PEER_NONCE, SERVER_NONCE)


@pytest.mark.parametrize("claimed", [{"role": "admin"}, {"role": "controller"},
                                     {"username": "mallory"}])
def test_role_and_username_are_bound_into_digest(claimed: dict[str, str]) -> None:
    """A proof made for one role and username does not verify for another."""
    with pytest.raises(AuthenticationError):
        verify(peer_proof(**claimed), peer_proof(role="node", username="achilles"), "peer")


def test_non_ascii_digest_is_refused_not_crashing() -> None:
    """A digest with non-ASCII characters is an AuthenticationError, not a UnicodeError."""
    with pytest.raises(AuthenticationError):
        verify(peer_proof(), "\u00e9" * 64, "node")


def test_matching_versions_pass() -> None:
    """The same protocol and Python version are accepted."""
    assert check_versions(PROTOCOL_VERSION, "3.11", "3.11", "node n1") is None


def test_protocol_version_mismatch_names_both_versions() -> None:
    """A different protocol version is refused with a message naming both versions."""
    remote = PROTOCOL_VERSION + 41
    with pytest.raises(VersionMismatchError) as info:
        check_versions(remote, "3.11", "3.11", "node n1")
    text = str(info.value)
    assert f"protocol {remote}" in text and f"speaks {PROTOCOL_VERSION}" in text
    assert "node n1" in text
    assert isinstance(info.value, AuthenticationError)


def test_python_version_mismatch_names_both_versions() -> None:
    """A different Python major.minor is refused with a message naming both versions."""
    with pytest.raises(VersionMismatchError) as info:
        check_versions(PROTOCOL_VERSION, "3.10", "3.11", "controller c1")
    text = str(info.value)
    assert "Python 3.10" in text and "Python 3.11" in text and "controller c1" in text


def test_make_nonce_refuses_short_randomness() -> None:
    """make_nonce refuses fewer than 16 random bytes and hex-encodes enough of them."""
    with pytest.raises(ValueError):
        make_nonce(b"\x00" * 15)
    assert make_nonce(b"\x01" * 16) == "01" * 16
    assert len(make_nonce(bytes(NONCE_BYTES))) == 2 * NONCE_BYTES

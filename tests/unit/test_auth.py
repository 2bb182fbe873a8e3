"""The handshake's proofs: the transcript they cover, replays, bound identities and
channel, nonce and name checks, versions, secret strength."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import secrets

import pytest

from achilles.errors import AuthenticationError, ProtocolError, VersionMismatchError
from achilles.protocol.auth import (
    NONCE_BYTES,
    WEAK_SECRET_BITS,
    Transcript,
    check_name,
    check_nonce,
    check_versions,
    make_nonce,
    peer_digest,
    refusal_digest,
    safe_name,
    secret_bits,
    server_digest,
    verify,
)
from achilles.protocol.messages import PROTOCOL_VERSION

SECRET = "correct horse battery staple"
SERVER_NONCE = make_nonce(bytes(range(NONCE_BYTES)))
PEER_NONCE = make_nonce(bytes(range(100, 100 + NONCE_BYTES)))


def _hmac(*fields: object) -> str:
    """The transcript's HMAC-SHA256, computed here independently of the code under test."""
    text = json.dumps(["achilles-auth-4", *fields], separators=(",", ":"))
    return hmac.new(SECRET.encode(), text.encode(), hashlib.sha256).hexdigest()


FIELDS = (SERVER_NONCE, PEER_NONCE, "node", "achilles", "host-a:12", PROTOCOL_VERSION,
          "3.11", "3.11", "ab" * 32, "cd" * 16)  # fmt: skip
T = Transcript(*FIELDS)


def test_proofs_are_hmacs_of_the_canonical_transcript() -> None:
    """Each proof is the HMAC of a JSON array of every field (documented format), and the
    other side, holding the same secret, accepts it."""
    assert peer_digest(SECRET, T) == _hmac("peer", *FIELDS)
    assert server_digest(SECRET, T, 7) == _hmac("server", *FIELDS, 7)
    assert refusal_digest(SECRET, T, "bad-name") == _hmac("refusal", *FIELDS, "bad-name")
    verify(_hmac("peer", *FIELDS), peer_digest(SECRET, T), "node")


def test_wrong_secret_fails_naming_the_setting() -> None:
    with pytest.raises(AuthenticationError, match="ACHILLES_SECRET_KEY") as info:
        verify(peer_digest(SECRET, T), peer_digest("wrong", T), "node n1")
    assert "node n1" in str(info.value)


@pytest.mark.parametrize(
    "field,value",
    [
        ("server_nonce", make_nonce(b"\x07" * NONCE_BYTES)),  # a replay to a fresh challenge
        ("peer_nonce", make_nonce(b"\x09" * NONCE_BYTES)),
        ("role", "controller"),
        ("role", "admin"),  # role escalation
        ("username", "mallory"),
        ("name", "other"),
        ("version", PROTOCOL_VERSION + 1),
        ("peer_python", "3.12"),
        ("server_python", "3.12"),
        ("binding", "cd" * 32),  # a man in the middle with its own certificate
        ("binding", ""),  # ... or one that stripped TLS
        ("session", "ef" * 16),  # another client's jobs
    ],
)
def test_every_field_is_bound_into_both_proofs(field: str, value: object) -> None:
    """Change any field and neither proof made for the original verifies."""
    other = dataclasses.replace(T, **{field: value})
    assert peer_digest(SECRET, other) != peer_digest(SECRET, T)
    assert server_digest(SECRET, other, 1) != server_digest(SECRET, T, 1)


def test_the_separator_attack_of_the_old_format_does_not_work() -> None:
    """The old proof was HMAC("|".join(parts)): a relay could hand the victim a server
    nonce ending in "|Z|controller|u" and replay the victim's admin digest as a
    controller named u. Fields are now JSON array items: no value can spill into the
    next field, so the two transcripts differ."""
    crafted = dataclasses.replace(T, server_nonce=SERVER_NONCE + "|Z|controller|u", role="admin")
    as_controller = dataclasses.replace(T, peer_nonce="Z", role="controller", username="u")
    assert peer_digest(SECRET, crafted) != peer_digest(SECRET, as_controller)
    with pytest.raises(ProtocolError, match="nonce"):
        check_nonce(crafted.server_nonce, "the server's")


def test_proofs_of_each_kind_differ() -> None:
    """A peer's proof cannot be reflected as the server's, nor a refusal's as either."""
    kinds = {
        peer_digest(SECRET, T),
        server_digest(SECRET, T, 1),
        refusal_digest(SECRET, T, "auth-failed"),
    }
    assert len(kinds) == 3
    assert server_digest(SECRET, T, 1) != server_digest(SECRET, T, 2)


@pytest.mark.parametrize(
    "nonce", ["", "ab" * 31, "AB" * 32, "zz" * 32, "ab" * 33, "ab" * 31 + "\n\n", "\ud800" * 64]
)
def test_malformed_nonces_are_refused(nonce: str) -> None:
    with pytest.raises(ProtocolError, match="64 lowercase hex"):
        check_nonce(nonce, "the peer's")


def test_make_nonce_takes_exactly_its_randomness() -> None:
    with pytest.raises(ValueError):
        make_nonce(b"\x00" * 16)
    nonce = make_nonce(secrets.token_bytes(NONCE_BYTES))
    check_nonce(nonce, "ours")


@pytest.mark.parametrize("name", ["achilles", "host-1.example.org:1234", "u@h", "a+b_c", "x" * 64])
def test_safe_names_pass(name: str) -> None:
    check_name(name, "the node name")


@pytest.mark.parametrize(
    "name", ["", "x" * 65, "-leading", "two words", "new\nline", "esc\x1b[31m", "quote'", "é"]
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(ProtocolError, match="letters, digits"):
        check_name(name, "the node name")


def test_safe_name_makes_a_valid_default() -> None:
    check_name(safe_name("my host\x1b[0m:42"), "default")
    assert safe_name("") == "node"


def test_same_versions_pass() -> None:
    assert check_versions(PROTOCOL_VERSION, "3.11", "3.11", "node n1") is None


def test_protocol_mismatch_names_both_versions() -> None:
    with pytest.raises(
        VersionMismatchError, match=f"speaks achilles protocol {PROTOCOL_VERSION + 1}"
    ):
        check_versions(PROTOCOL_VERSION + 1, "3.11", "3.11", "node n1")


def test_python_mismatch_names_both_versions() -> None:
    with pytest.raises(VersionMismatchError, match=r"runs Python 3\.10.*runs Python 3\.11"):
        check_versions(PROTOCOL_VERSION, "3.10", "3.11", "controller c1")


def test_secret_strength_estimate() -> None:
    """Short or repetitive secrets score under the warning line, a generated one far
    above it."""
    for weak in ("", "k", "secret", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "abababababababab"):
        assert secret_bits(weak) < WEAK_SECRET_BITS, weak
    assert secret_bits(secrets.token_urlsafe(32)) > 2 * WEAK_SECRET_BITS

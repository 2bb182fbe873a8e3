"""The server logs every handshake it refuses: one WARNING line with the peer's address
and both sides' versions, the peer's own text cut short and escaped.

In memory, as in ``test_server_protocol``: a ``ServerProtocol`` over a
``StringTransport``, time a ``task.Clock``, the server's frames read with ``Decoder``; the
log is the stdlib ``achilles.server`` logger, captured with ``caplog``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import wire
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from wire import Decoder, encode_bytes

from achilles.config import Settings
from achilles.core.throttle import FREE_FAILURES, REPORT_INTERVAL
from achilles.net.connection import PYTHON
from achilles.protocol import messages as m
from achilles.server import SHOWN_MAX, ServerFactory

SECRET = "refusal log secret"
PEER = IPv4Address("TCP", "10.0.0.7", 40123)


def handshake(
    caplog: pytest.LogCaptureFixture, secret: str = SECRET, **fields: Any
) -> tuple[m.ErrorFrame, list[logging.LogRecord], StringTransport]:
    """Connect, answer the challenge with an AuthReply (``fields`` override its defaults),
    and return the server's error frame, its WARNING records and the transport."""
    factory = ServerFactory(Settings(secret_key=SECRET, port=0), clock=task.Clock())
    transport = StringTransport(peerAddress=PEER)
    proto = factory.buildProtocol(PEER)
    proto.makeConnection(transport)
    decoder = Decoder()
    (challenge,) = [f.msg for f in decoder.feed(transport.value())]
    transport.clear()
    assert isinstance(challenge, m.Challenge)
    reply: dict[str, Any] = dict(role="node", name="node-a")
    reply.update(fields)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="achilles.server"):
        proto.dataReceived(encode_bytes(wire.auth_reply(challenge.nonce, secret, **reply)))
    frames = [f.msg for f in decoder.feed(transport.value())]
    assert len(frames) == 1 and isinstance(frames[0], m.ErrorFrame), frames
    records = [r for r in caplog.records if r.name == "achilles.server"]
    return frames[0], records, transport


@pytest.mark.parametrize(
    "fields,theirs",
    [
        ({"python": "3.99"}, "Python '3.99'"),
        ({"version": m.PROTOCOL_VERSION + 1}, f"protocol {m.PROTOCOL_VERSION + 1}"),
    ],
    ids=["python", "protocol"],
)
def test_version_mismatch_is_refused_and_logged_with_both_versions(
    caplog: pytest.LogCaptureFixture, fields: dict[str, Any], theirs: str
) -> None:
    """A hello from another Python or protocol version gets a version-mismatch frame and
    one WARNING line naming the peer's address and both sides' versions."""
    err, records, transport = handshake(caplog, **fields)
    assert err.code == "version-mismatch" and transport.disconnecting
    assert len(records) == 1, [r.getMessage() for r in records]
    record = records[0]
    text = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "10.0.0.7:40123" in text and "version-mismatch" in text and theirs in text, text
    assert f"server achilles protocol {m.PROTOCOL_VERSION}, Python {PYTHON}" in text, text
    assert "\n" not in text


def test_wrong_secret_refusal_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A hello with the wrong secret is refused as auth-failed and logged with the
    peer's address (and later ones from that address only counted: see below)."""
    err, records, _ = handshake(caplog, secret="not the cluster secret")
    assert err.code == "auth-failed"
    assert len(records) == 1
    text = records[0].getMessage()
    assert "10.0.0.7:40123" in text and "wrong secret" in text, text


def test_failed_logins_are_throttled_and_reported_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An online guesser: after FREE_FAILURES failures its next connection is refused
    before any challenge ("throttled"), the wait doubling; its failures make one log
    line at once and one report a minute, not a line each."""
    clock = task.Clock()
    clock.advance(1000)
    factory = ServerFactory(Settings(secret_key=SECRET, port=0), clock=clock)
    factory.startFactory()
    codes = []
    with caplog.at_level(logging.WARNING, logger="achilles.server"):
        for attempt in range(FREE_FAILURES + 3):
            transport = StringTransport(peerAddress=PEER)
            proto = factory.buildProtocol(PEER)
            proto.makeConnection(transport)
            decoder = Decoder()
            frames = [f.msg for f in decoder.feed(transport.value())]
            if isinstance(frames[0], m.ErrorFrame):
                codes.append(frames[0].code)
            else:
                transport.clear()
                proto.dataReceived(
                    encode_bytes(
                        wire.auth_reply(frames[0].nonce, "wrong guess %d" % attempt, role="node")
                    )
                )
                codes.append(decoder.feed(transport.value())[0].msg.code)
            proto.connectionLost(None)
        clock.advance(REPORT_INTERVAL)
    factory.stopFactory()
    assert codes == ["auth-failed"] * FREE_FAILURES + ["auth-failed", "throttled", "throttled"]
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "achilles.server" and "login" in r.getMessage()
    ]
    assert len(lines) == 2, lines  # the first failure, then one report for the rest
    assert f"{FREE_FAILURES + 1} failed login(s) from 10.0.0.7" in lines[1], lines


def test_peer_text_in_the_log_is_bounded_and_escaped(caplog: pytest.LogCaptureFixture) -> None:
    """A peer's Python version and name reach the log cut to SHOWN_MAX characters, on
    one line, with newlines and terminal escapes escaped."""
    hostile = "3.99\nFAKE: node accepted\x1b[2J" + "x" * 150
    err, records, _ = handshake(caplog, python=hostile, name=hostile)
    assert err.code == "bad-name"
    assert len(records) == 1
    text = records[0].getMessage()
    assert "\n" not in text and "\x1b" not in text, text
    assert "\\n" in text and "\\x1b" in text, text
    assert "x" * (SHOWN_MAX + 1) not in text, text
    assert f"({len(hostile)} chars)" in text, text
    assert len(text) < 400, len(text)

"""Property-based fuzzing of the protocol core and the server shell, in memory.

Random sequences of valid frames and mutated ones (truncated, bit-flipped, spliced with
garbage, headers with fields removed or replaced by arbitrary JSON, lone surrogates,
lying lengths) are fed in random splits to (i) the sans-IO ``Decoder`` and (ii) a
``ServerProtocol`` over a ``StringTransport``, before and after authentication.

A few examples run by default, to keep tests/unit fast; run many on demand with
``ACHILLES_FUZZ_EXAMPLES=20000 python -m pytest tests/unit/test_fuzz.py``.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import pytest
import wire
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from wire import Decoder, encode_bytes

from achilles.config import Settings
from achilles.errors import ProtocolError
from achilles.net.connection import PYTHON
from achilles.protocol import messages as m
from achilles.protocol.framing import MAX_HEADER_LENGTH, PREAUTH_MAX_HEADER_LENGTH, Frame
from achilles.server import ServerFactory, ServerProtocol

# Hypothesis imports libcst to print a failing example as a patch; libcst's import warns,
# and filterwarnings=error would turn the report of a real failure into an INTERNALERROR.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

EXAMPLES = int(os.environ.get("ACHILLES_FUZZ_EXAMPLES", "50"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SECRET = "fuzz secret"
MAX_PAYLOAD = 64

# --- frames: valid ones from a small world (two jobs, a few chunks), then mutations ----------
_jobs = st.sampled_from(["j1", "j2", "nope", ""])
_seqs = st.integers(min_value=-1, max_value=3)
_floats = st.sampled_from([0.0, 0.5, 1e300, -1.0])
_small = st.binary(max_size=MAX_PAYLOAD + 2)
_strs = st.text(max_size=6) | st.sampled_from(["\ud800", "a\udfffb", "\x00", "é" * 3])

_valid = st.one_of(
    st.builds(lambda: (m.Heartbeat(), b"")),
    st.builds(
        lambda j, p: (m.Submit(job=j, max_attempts=3, timeout=0.0, limit=0, total=-1), p),
        _jobs,
        _small,
    ),
    st.builds(lambda j, s, p: (m.Chunk(job=j, seq=s), p), _jobs, _seqs, _small),
    st.builds(
        lambda j, s, st_, e, p: (m.Result(job=j, seq=s, status=st_, elapsed=e), p),
        _jobs,
        _seqs,
        st.sampled_from(sorted(m.STATUSES) + ["bogus"]),
        _floats,
        _small,
    ),
    st.builds(
        lambda j, ps: (
            m.Chunks(job=j, seqs=[q for q, _ in ps], sizes=[len(p) for _, p in ps]),
            b"".join(p for _, p in ps),
        ),
        _jobs,
        st.lists(st.tuples(_seqs, st.binary(max_size=8)), min_size=1, max_size=4),
    ),
    st.builds(
        lambda j, rs: (
            m.Results(
                job=j,
                seqs=[q for q, _, _ in rs],
                sizes=[len(p) for _, _, p in rs],
                statuses=[s_ for _, s_, _ in rs],
                elapsed=[0.001] * len(rs),
            ),
            b"".join(p for _, _, p in rs),
        ),
        _jobs,
        st.lists(
            st.tuples(
                _seqs, st.sampled_from(sorted(m.STATUSES) + ["bogus"]), st.binary(max_size=8)
            ),
            min_size=1,
            max_size=4,
        ),
    ),
    st.builds(
        lambda j, s: (m.Tasks(job=j, seqs=[s, s + 1], sizes=[1, 1], timeout=0.0), b"tt"),
        _jobs,
        _seqs,
    ),
    st.builds(lambda j: (m.Cancel(job=j), b""), _jobs),
    st.builds(lambda j: (m.End(job=j), b""), _jobs),
    st.builds(lambda: (m.StatusRequest(), b"")),
    st.builds(lambda: (m.Drain(), b"")),
    st.builds(lambda: (m.Kill(), b"")),
    st.builds(lambda c, d: (m.ErrorFrame(code=c, detail=d), b""), _strs, _strs),
    st.builds(lambda j, s: (m.Task(job=j, seq=s, timeout=0.0), b"t"), _jobs, _seqs),
    st.builds(lambda n: (m.Welcome(digest="00" * 32, peer_id=n), b""), _seqs),
    st.builds(
        lambda r, u, n, d, v, py: (
            m.AuthReply(
                role=r,
                username=u,
                nonce=n,
                digest=d,
                version=v,
                python=py,
                slots=1,
                name="x",
                session="ab" * 16,
            ),
            b"",
        ),
        st.sampled_from(list(m.ROLES) + ["root"]),
        _strs,
        _strs,
        _strs,
        st.sampled_from([m.PROTOCOL_VERSION, 0, 2]),
        st.sampled_from([PYTHON, "3.1"]),
    ),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _strs,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_strs, inner, max_size=3),
    max_leaves=6,
)
_keys = st.sampled_from(sorted({k for f in m.FIELD_TYPES.values() for k in f} | {"t", "len"}))


@st.composite
def frames(draw: Any) -> bytes:
    """One valid frame, or a mutation of one."""
    msg, payload = draw(_valid)
    data = encode_bytes(msg, payload)
    how = draw(
        st.sampled_from(
            ["valid", "valid", "header", "truncate", "flip", "insert", "garbage", "long"]
        )
    )
    if how == "header":  # rewrite the header as JSON with a field removed or replaced
        header, _, rest = data.partition(b"\n")
        obj = json.loads(header)
        key = draw(_keys)
        if draw(st.booleans()):
            obj.pop(key, None)
        else:
            obj[key] = draw(_json)
        return json.dumps(obj).encode() + b"\n" + rest
    if how == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if how == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1 :]
    if how == "insert":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
    if how == "garbage":
        return draw(st.binary(max_size=40))
    if how == "long":  # a header line near, at or over a limit
        size = draw(st.sampled_from([PREAUTH_MAX_HEADER_LENGTH, MAX_HEADER_LENGTH]))
        pad = size + draw(st.integers(-2, 2)) - len(data)
        return data[:-1] + b" " * max(0, pad) + data[-1:] if data.endswith(b"\n") else data
    return data


_streams = st.lists(frames(), min_size=1, max_size=8).map(b"".join)
_cuts = st.lists(st.integers(min_value=0, max_value=20000), max_size=8)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[lo:hi] for lo, hi in itertools.pairwise(bounds)]


# --- (i) the decoder ---------------------------------------------------------------------------
def held(decoder: Decoder) -> int:
    """Bytes the decoder keeps between feeds: its line buffer and the payload so far."""
    return decoder.held


@FUZZ
@given(_streams, _cuts, st.booleans())
def test_decoder_raises_only_protocol_error_and_stays_bounded(
    data: bytes, cuts: list[int], authenticated: bool
) -> None:
    """Any stream, split anywhere, gives frames or a ProtocolError, within its memory limits."""
    decoder = Decoder(max_payload=MAX_PAYLOAD, allow_payload=authenticated)
    max_header = MAX_HEADER_LENGTH if authenticated else PREAUTH_MAX_HEADER_LENGTH
    for piece in pieces(data, cuts):
        try:
            out = decoder.feed(piece)
        except ProtocolError as exc:
            assert exc.code and isinstance(exc.detail, str)
            return
        assert all(isinstance(f, Frame) and isinstance(f.msg, m.Message) for f in out)
        assert all(len(f.payload) <= MAX_PAYLOAD for f in out)
        assert authenticated or not any(f.payload for f in out)
        assert len(decoder._buf) - decoder._pos <= max_header
        assert sum(len(p) for p in decoder._parts) <= MAX_PAYLOAD
        assert held(decoder) <= max_header + MAX_PAYLOAD


# --- (ii) the server protocol ------------------------------------------------------------------
class Conn:
    """A ServerProtocol on a StringTransport, with the server's frames decoded."""

    _ports = itertools.count(1)

    def __init__(self, factory: ServerFactory) -> None:
        addr = IPv4Address("TCP", "10.9.9.9", next(self._ports))
        self.transport = StringTransport(peerAddress=addr)
        self.proto: ServerProtocol = factory.buildProtocol(addr)
        self.proto.makeConnection(self.transport)
        self.decoder = Decoder()
        self.frames: list[Frame] = []
        self.lost = False
        self.challenge = self.read()[0].msg

    def read(self) -> list[Frame]:
        """New frames from the server; they must always decode (it never writes junk)."""
        data = self.transport.value()
        self.transport.clear()
        new = self.decoder.feed(data)
        self.frames.extend(new)
        return new

    def authenticate(self, role: str) -> None:
        self.proto.dataReceived(
            encode_bytes(
                wire.auth_reply(self.challenge.nonce, SECRET, role, "fuzz", f"fuzz-{role}")
            )
        )
        assert any(isinstance(f.msg, m.Welcome) for f in self.read())

    def lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.proto.connectionLost(Failure(ConnectionDone()))


@FUZZ
@given(st.sampled_from([None, "controller", "node", "admin"]), _streams, _cuts)
def test_server_protocol_never_raises_and_answers_with_error_frame(
    role: str | None, data: bytes, cuts: list[int]
) -> None:
    """Fuzzed input to a server connection never raises; a close follows an error frame."""
    clock = task.Clock()
    factory = ServerFactory(Settings(secret_key=SECRET, max_payload=MAX_PAYLOAD), clock=clock)
    factory.startFactory()
    target = Conn(factory)
    if role is not None:
        target.authenticate(role)
    node, ctl = Conn(factory), Conn(factory)  # bystanders: a job with work in flight
    node.authenticate("node")
    ctl.authenticate("controller")
    for msg, payload in [
        (m.Submit(job="j1", max_attempts=2, timeout=0.0, limit=0, total=2), b"F"),
        (m.Chunk(job="j1", seq=0), b"A"),
        (m.Chunk(job="j1", seq=1), b"B"),
    ]:
        ctl.proto.dataReceived(encode_bytes(msg, payload))
    conns = [target, node, ctl]
    try:
        for piece in pieces(data, cuts):
            target.proto.dataReceived(piece)
            for c in conns:
                c.read()
            if target.transport.disconnecting:
                break  # a real transport stops reading once the server closes
            clock.advance(0.5)
        if target.transport.disconnecting:
            assert any(isinstance(f.msg, m.ErrorFrame) for f in target.frames), target.frames
        assert not node.transport.disconnecting and not ctl.transport.disconnecting
        for c in conns:
            c.lose()
        assert factory.open_connections == 0
        assert not factory.peers and not factory.scheduler.nodes
        assert not factory.scheduler.jobs
    finally:
        factory.stopFactory()

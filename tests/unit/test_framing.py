"""Sans-IO framing: round trips, every split of a byte stream, limits, malformed headers."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire import Decoder, encode_bytes

from achilles.errors import ProtocolError
from achilles.protocol import messages as m
from achilles.protocol.framing import (
    BATCH_LIMIT,
    INT_MAX,
    INT_MIN,
    MAX_HEADER_LENGTH,
    Frame,
    FrameReader,
    encode,
    parse_header,
    runs,
    split,
)

# One sample of every frame type; payloads contain newlines so that a decoder which
# looked for delimiters inside a payload would break.
SAMPLES: list[tuple[m.Message, bytes]] = [
    (m.Hello(), b""),
    (m.Challenge(nonce="ab" * 16, version=1, python="3.11"), b""),
    (
        m.AuthReply(
            role="node",
            username="achilles",
            nonce="cd" * 16,
            digest="ef" * 32,
            version=1,
            python="3.11",
            slots=4,
            name="n\u00f6de-1",
            session="ab" * 16,
        ),
        b"",
    ),
    (m.Welcome(digest="01" * 32, peer_id=7), b""),
    (m.ErrorFrame(code="bad-json", detail="header is not JSON"), b""),
    (m.Heartbeat(), b""),
    (m.Submit(job="j1", max_attempts=3, timeout=2.5, limit=0, total=-1), b"FUNC\nBUNDLE"),
    (m.Chunk(job="j1", seq=0), b"\n"),
    (m.Chunk(job="j1", seq=1), b"a\nb\r\n" * 5),
    (m.Chunks(job="j1", seqs=[2, 3, 4], sizes=[2, 0, 3]), b"a\nb\nc"),
    (m.Cancel(job="j1"), b""),
    (m.End(job="j1"), b""),
    (m.Kill(), b""),
    (m.StatusRequest(), b""),
    (m.Function(job="j1"), b'\x00\xff\n{"t":"hb"}\n'),
    (m.Task(job="j1", seq=1, timeout=0.0), b"payload"),
    (m.Tasks(job="j1", seqs=[5, 6], sizes=[1, 1], timeout=1.5), b"\n\n"),
    (m.Result(job="j1", seq=1, status=m.OK, elapsed=0.125), b"R" * 40),
    (
        m.Results(
            job="j1", seqs=[1, 2], sizes=[3, 1], statuses=[m.OK, m.ERROR], elapsed=[0.5, 1e-06]
        ),
        b"R\nRE",
    ),
    (m.Drain(), b""),
    (m.NodeInfo("0.1.0", "3.11.7", "worker-7.lab", "up", 4242), b""),
    (m.Output("j1", 3, "", 0), b'[["out", "hello\\n"]]'),
    (m.NodeStats(cpu=187.5, rss=123456789), b""),
    (m.Failure("j1", 3, "ValueError"), b"Traceback ...\nValueError: <b>bad</b>\n"),
    (m.JobFailed(job="j1", seq=3, reason="crashed"), "worker died \u2620".encode()),
    (m.Cluster(nodes=2, slots=8), b""),
    (m.Status(), b'{"nodes": []}'),
    (m.Killed(nodes=2), b""),
]
STREAM = b"".join(encode_bytes(msg, payload) for msg, payload in SAMPLES)
EXPECTED = [Frame(msg, payload) for msg, payload in SAMPLES]


def decode_all(data: bytes, **kwargs: object) -> list[Frame]:
    return Decoder(**kwargs).feed(data)  # type: ignore[arg-type]


def decode_line(header: dict[str, object] | bytes, **kwargs: object) -> list[Frame]:
    line = header if isinstance(header, bytes) else json.dumps(header).encode()
    return decode_all(line + b"\n", **kwargs)


def error_code(header: dict[str, object] | bytes, **kwargs: object) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_line(header, **kwargs)
    return info.value.code


# --- round trips --------------------------------------------------------------------------
def test_samples_cover_every_message_type() -> None:
    """The round-trip samples include one frame of every registered type."""
    assert {type(msg).TYPE for msg, _ in SAMPLES} == set(m.MESSAGES)


@pytest.mark.parametrize(
    "fields",
    [
        {"host": "evil\x1b[2Jhost"},
        {"version": "1" * 65},
        {"launcher": "up\nFAKE LOG LINE"},
        {"pid": -1},
        {"pid": 2**40},
    ],
)
def test_node_info_refuses_what_it_could_not_show(fields: dict[str, object]) -> None:
    """A node's self-description is shown as it is, so only a short safe alphabet and a
    real pid pass."""
    header = {"t": "nodeinfo", "version": "0.1.0", "python": "3.11.7", "host": "h"}
    header |= {"launcher": "up", "pid": 1, **fields}
    assert error_code(header) == "bad-field"


@pytest.mark.parametrize("msg,payload", SAMPLES, ids=[type(s[0]).__name__ for s in SAMPLES])
def test_round_trip_each_type(msg: m.Message, payload: bytes) -> None:
    """Encoding a frame and decoding the bytes gives back the same message and payload."""
    assert decode_all(encode_bytes(msg, payload)) == [Frame(msg, payload)]


def test_encode_returns_header_and_payload_pieces() -> None:
    """encode gives a newline-terminated header and the payload as separate pieces."""
    header, payload = encode(m.Chunk(job="j", seq=4), b"xyz")
    assert header.endswith(b"\n") and header.count(b"\n") == 1
    assert json.loads(header) == {"t": "chunk", "len": 3, "job": "j", "seq": 4}
    assert payload == b"xyz"
    assert encode(m.Heartbeat()) == [b'{"t":"hb","len":0}\n']


def test_whole_stream_decodes_in_one_feed() -> None:
    """A stream of many frames fed at once yields every frame in order."""
    assert decode_all(STREAM) == EXPECTED


# --- every split (Twisted's test_buffer) --------------------------------------------------
def test_every_chunk_size_gives_same_frames() -> None:
    """Feeding the stream in pieces of every size 1..N yields the same frames."""
    for size in range(1, len(STREAM) + 1):
        decoder = Decoder()
        frames: list[Frame] = []
        for i in range(0, len(STREAM), size):
            frames.extend(decoder.feed(STREAM[i : i + size]))
        assert frames == EXPECTED, f"chunk size {size}"


def test_every_two_way_split_gives_same_frames() -> None:
    """Splitting a stream once at every offset, newlines and payloads included, changes nothing."""
    sample = [
        Frame(m.Heartbeat()),
        Frame(m.Chunk(job="j", seq=1), b"a\nb\r\n"),
        Frame(m.Cancel(job="j")),
        Frame(m.Status(), b"\n"),
    ]
    stream = b"".join(encode_bytes(f.msg, f.payload) for f in sample)
    for cut in range(len(stream) + 1):
        decoder = Decoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == sample, cut


def test_split_at_newline_and_inside_payload() -> None:
    """A frame arrives only once its newline and all of its payload have been fed."""
    data = encode_bytes(m.Chunk(job="j", seq=0), b"pay\nload")
    newline = data.index(b"\n")
    decoder = Decoder()
    assert decoder.feed(data[:newline]) == []
    assert decoder.feed(data[newline : newline + 1]) == []  # header complete, payload owed
    assert decoder.feed(data[newline + 1 : newline + 4]) == []  # "pay"
    assert decoder.feed(data[newline + 4 :] + b'{"t":"hb","len":0}\n') == [
        Frame(m.Chunk(job="j", seq=0), b"pay\nload"),
        Frame(m.Heartbeat()),
    ]


def test_frame_reader_gives_one_frame_at_a_time_and_keeps_only_a_partial_header() -> None:
    """FrameReader hands out frames one by one; between feeds it holds at most a partial
    header line, and a payload split across feeds is returned whole."""
    reader = FrameReader(allow_payload=True)
    reader.feed(b'{"t":"hb","len":0}\n{"t":"chunk","len":5,"job":"j","seq":2}\nab')
    assert reader.next() == Frame(m.Heartbeat())
    assert reader.next() is None  # header read, payload owed
    assert reader.held == 2
    reader.feed(b'cde{"t":"hb"')
    assert reader.next() == Frame(m.Chunk(job="j", seq=2), b"abcde")
    assert reader.next() is None
    assert reader.held == len(b'{"t":"hb"')
    reader.feed(b',"len":0}\n')
    assert reader.next() == Frame(m.Heartbeat())
    assert reader.next() is None and reader.held == 0


def test_frame_reader_is_linear_in_frames_per_feed() -> None:
    """Thousands of small frames in one feed are read without re-copying what is left
    (LineReceiver's line/raw switching re-split the rest of the buffer every frame)."""
    one = encode_bytes(m.Result(job="j", seq=1, status=m.OK, elapsed=0.0), b"r\n" * 8)
    data = one * 5000
    reader = FrameReader(allow_payload=True)
    reader.feed(data)
    frames = 0
    while reader.next() is not None:
        frames += 1
        assert reader._buf is data  # read in place: the rest is never copied or re-split
    assert frames == 5000 and reader.held == 0


def test_frame_reader_limits_change_after_authentication() -> None:
    """Before authenticated(): no payloads, short headers; after: both allowed."""
    reader = FrameReader()
    reader.feed(encode_bytes(m.Chunk(job="j", seq=0), b"x"))
    with pytest.raises(ProtocolError) as info:
        reader.next()
    assert info.value.code == "payload-before-auth"
    reader = FrameReader()
    reader.authenticated()
    reader.feed(encode_bytes(m.Chunk(job="j", seq=0), b"x"))
    assert reader.next() == Frame(m.Chunk(job="j", seq=0), b"x")


def test_encode_matches_json_dumps() -> None:
    """The hand-built header is exactly json.dumps of the same fields, compact."""
    for msg, payload in SAMPLES + [
        (m.ErrorFrame(code='q"', detail="\u2603\x00\n\\"), b""),
        (m.Result(job="j", seq=2**70, status="ok", elapsed=1e-300), b"x"),
    ]:
        header: dict[str, object] = {"t": msg.TYPE, "len": len(payload)}
        header.update({f: getattr(msg, f) for f in m.FIELD_TYPES[msg.TYPE]})
        expected = json.dumps(header, separators=(",", ":")).encode() + b"\n"
        assert encode(msg, payload)[0] == expected


# --- limits -------------------------------------------------------------------------------
def _error_frame_line(length: int) -> bytes:
    base = len(encode_bytes(m.ErrorFrame(code="c", detail=""))) - 1
    line = encode_bytes(m.ErrorFrame(code="c", detail="x" * (length - base)))[:-1]
    assert len(line) == length
    return line


def test_header_exactly_at_limit_is_accepted() -> None:
    """A header line of exactly MAX_HEADER_LENGTH bytes decodes."""
    line = _error_frame_line(MAX_HEADER_LENGTH)
    [frame] = decode_all(line + b"\n")
    assert encode_bytes(frame.msg) == line + b"\n"
    decoder = Decoder()  # and also when its bytes arrive without the newline first
    assert decoder.feed(line) == []
    assert len(decoder.feed(b"\n")) == 1


def test_header_one_over_limit_is_rejected() -> None:
    """A header line of MAX_HEADER_LENGTH + 1 bytes is a header-too-long error."""
    line = _error_frame_line(MAX_HEADER_LENGTH + 1)
    assert error_code(line) == "header-too-long"
    with pytest.raises(ProtocolError) as info:
        parse_header(line)
    assert info.value.code == "header-too-long"


def test_header_without_newline_rejected_once_over_limit() -> None:
    """Bytes without a newline are refused as soon as they pass MAX_HEADER_LENGTH."""
    decoder = Decoder()
    assert decoder.feed(b"x" * MAX_HEADER_LENGTH) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(b"x")
    assert info.value.code == "header-too-long"


def test_payload_exactly_at_limit_is_accepted() -> None:
    """A payload of exactly max_payload bytes decodes."""
    data = encode_bytes(m.Chunk(job="j", seq=0), b"p" * 16)
    assert decode_all(data, max_payload=16) == [Frame(m.Chunk(job="j", seq=0), b"p" * 16)]


def test_payload_one_over_limit_is_rejected_from_header() -> None:
    """A header announcing max_payload + 1 bytes is refused before any payload arrives."""
    header = encode(m.Chunk(job="j", seq=0), b"p" * 17)[0]
    with pytest.raises(ProtocolError) as info:
        Decoder(max_payload=16).feed(header)
    assert info.value.code == "payload-too-large"


# --- malformed headers --------------------------------------------------------------------
@pytest.mark.parametrize("line", [b"not json", b"{", b"\xff\xfe{}", b"{'t': 'hb'}", b""])
def test_non_json_header(line: bytes) -> None:
    """A header that is not JSON is a bad-json error."""
    assert error_code(line) == "bad-json"


def test_deeply_nested_json_header() -> None:
    """A deeply nested header is a ProtocolError, never a RecursionError (3.11 and 3.12
    hit the parser's recursion limit: bad-json; 3.13 parses it: not-object)."""
    assert error_code(b"[" * 4000 + b"]" * 4000) in ("bad-json", "not-object")


@pytest.mark.parametrize("line", [b"[1, 2]", b'"hb"', b"3", b"null", b"true"])
def test_json_non_object_header(line: bytes) -> None:
    """A header that is JSON but not an object is a not-object error."""
    assert error_code(line) == "not-object"


@pytest.mark.parametrize("header", [{"len": 0}, {"t": 1}, {"t": None}, {"t": ["hb"]}])
def test_missing_or_non_string_type(header: dict[str, object]) -> None:
    """A header without a string 't' is a bad-type error."""
    assert error_code(header) == "bad-type"


def test_unknown_type() -> None:
    """A header whose 't' names no frame type is an unknown-type error."""
    assert error_code({"t": "bogus", "len": 0}) == "unknown-type"


@pytest.mark.parametrize("length", [-1, "3", 1.5, True, False, None, [1]])
def test_bad_length(length: object) -> None:
    """A 'len' that is negative, not an int, or a bool is a bad-length error."""
    assert error_code({"t": "chunk", "len": length, "job": "j", "seq": 0}) == "bad-length"


def test_missing_length_means_no_payload() -> None:
    """A header without 'len' is a frame with an empty payload."""
    assert decode_line({"t": "hb"}) == [Frame(m.Heartbeat())]


def test_payload_on_type_without_payload() -> None:
    """A non-zero 'len' on a frame type that takes no payload is an unexpected-payload error."""
    assert error_code({"t": "hb", "len": 3}) == "unexpected-payload"
    assert error_code({"t": "cancel", "len": 1, "job": "j"}) == "unexpected-payload"


def test_payload_before_auth() -> None:
    """Before authentication a payload is refused, while payload-less frames pass."""
    header = {"t": "chunk", "len": 3, "job": "j", "seq": 0}
    assert error_code(header, allow_payload=False) == "payload-before-auth"
    assert decode_line({"t": "hb", "len": 0}, allow_payload=False) == [Frame(m.Heartbeat())]
    reader = FrameReader()  # the shells' reader starts unauthenticated
    reader.feed(json.dumps(header).encode() + b"\n")
    with pytest.raises(ProtocolError) as info:
        reader.next()
    assert info.value.code == "payload-before-auth"


@pytest.mark.parametrize(
    "header",
    [
        {"t": "chunk", "len": 0, "job": "j"},
        {"t": "welcome", "digest": "00"},
        {"t": "result", "job": "j", "seq": 0, "status": "ok"},
    ],
)
def test_missing_field(header: dict[str, object]) -> None:
    """A header lacking one of its type's fields is a bad-field error."""
    assert error_code(header) == "bad-field"


@pytest.mark.parametrize(
    "field,value",
    [
        ("seq", "1"),
        ("seq", 1.0),
        ("seq", True),
        ("seq", None),
        ("job", 5),
        ("job", ["j"]),
        ("timeout", "1"),
        ("timeout", None),
        ("timeout", False),
    ],
)
def test_wrong_field_type(field: str, value: object) -> None:
    """A field of the wrong JSON type (bools count as wrong for numbers) is a bad-field error."""
    header = {"t": "task", "len": 0, "job": "j", "seq": 1, "timeout": 0.5}
    header[field] = value
    assert error_code(header) == "bad-field"


def test_int_accepted_for_float_field() -> None:
    """An integer in a float field is accepted and becomes a float."""
    [frame] = decode_line({"t": "task", "len": 0, "job": "j", "seq": 1, "timeout": 3})
    assert frame.msg == m.Task(job="j", seq=1, timeout=3.0)
    assert type(frame.msg.timeout) is float  # type: ignore[attr-defined]


def test_huge_int_in_float_field_is_protocol_error() -> None:
    """An int too large for a float in a float field is bad-field, not OverflowError."""
    line = b'{"t":"task","len":0,"job":"j","seq":1,"timeout":' + b"9" * 400 + b"}"
    assert error_code(line) == "bad-field"


def test_extra_fields_are_ignored() -> None:
    """Unknown extra keys in a header do not prevent decoding."""
    assert decode_line({"t": "cancel", "job": "j", "extra": [1, 2]}) == [Frame(m.Cancel(job="j"))]


# --- fuzzing ------------------------------------------------------------------------------
def _feed_in_pieces(data: bytes, cuts: list[int], **kwargs: object) -> list[Frame]:
    decoder = Decoder(**kwargs)  # type: ignore[arg-type]
    frames: list[Frame] = []
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for lo, hi in itertools.pairwise(bounds):
        frames.extend(decoder.feed(data[lo:hi]))
    return frames


FUZZ = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
_frames = st.sampled_from([encode_bytes(*s) for s in SAMPLES])
_json_value = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.lists(st.integers(), max_size=2)
)
_field_names = sorted({name for fields in m.FIELD_TYPES.values() for name in fields} | {"len"})


@FUZZ
@given(
    st.tuples(st.binary(max_size=40), _frames, st.binary(max_size=40), _frames),
    st.lists(st.integers(min_value=0, max_value=400), max_size=5),
)
def test_arbitrary_bytes_yield_frames_or_protocol_error(
    pieces: tuple[bytes, ...], cuts: list[int]
) -> None:
    """Any byte stream, split anywhere, gives frames or a ProtocolError and nothing else."""
    data = b"".join(pieces)
    try:
        frames = _feed_in_pieces(data, cuts, max_payload=64)
    except ProtocolError as exc:
        assert exc.code
    else:
        assert all(isinstance(f, Frame) and isinstance(f.msg, m.Message) for f in frames)


@settings(FUZZ, max_examples=100)
@given(
    st.sampled_from(sorted(m.MESSAGES)),
    st.dictionaries(st.sampled_from(_field_names), _json_value, max_size=6),
    st.binary(max_size=20),
    st.booleans(),
)
def test_arbitrary_headers_yield_typed_frames_or_protocol_error(
    t: str, fields: dict[str, object], tail: bytes, allow_payload: bool
) -> None:
    """A JSON header with arbitrary field values decodes to its type, or is a ProtocolError."""
    line = json.dumps({"t": t, **fields}).encode()
    try:
        frames = Decoder(max_payload=64, allow_payload=allow_payload).feed(line + b"\n" + tail)
    except ProtocolError as exc:
        assert exc.code
    else:
        assert not frames or type(frames[0].msg) is m.MESSAGES[t]


@pytest.mark.parametrize(
    "header,payload,why",
    [
        ({"seqs": [1, 2], "sizes": [1, 1]}, b"abc", "sizes do not add up"),
        ({"seqs": [1], "sizes": [1, 1]}, b"ab", "has 2 items, not 1"),
        ({"seqs": [], "sizes": []}, b"", "with 0 items"),
        ({"seqs": [1, "2"], "sizes": [1, 1]}, b"ab", "must be int"),
        ({"seqs": 1, "sizes": [1]}, b"a", "must be a list"),
        ({"seqs": [1, 2], "sizes": [3, -1]}, b"ab", "do not add up"),
        ({"seqs": list(range(1025)), "sizes": [0] * 1025}, b"", "1 to 1024"),
    ],
)
def test_malformed_batch_frames_are_bad_fields(
    header: dict[str, object], payload: bytes, why: str
) -> None:
    """A batch whose lists disagree in length, hold the wrong types, or whose sizes do not
    cut its payload exactly is a bad-field error naming the problem."""
    line = json.dumps({"t": "chunks", "len": len(payload), "job": "j", **header}).encode()
    with pytest.raises(ProtocolError) as info:
        decode_all(line + b"\n" + payload)
    assert info.value.code == "bad-field" and why in info.value.detail


def test_batch_float_list_accepts_ints_and_refuses_non_finite() -> None:
    """elapsed lists take ints as floats, like float fields; NaN is refused."""
    base = (
        '{"t":"results","len":2,"job":"j","seqs":[1,2],"sizes":[1,1],'
        '"statuses":["ok","ok"],"elapsed":[%s]}\nab'
    )
    [frame] = decode_all((base % "1, 0.5").encode())
    assert frame.msg.elapsed == [1.0, 0.5] and type(frame.msg.elapsed[0]) is float
    with pytest.raises(ProtocolError):
        decode_all((base % "1, NaN").encode())


def test_split_and_runs_cut_batches() -> None:
    """split cuts a batch payload by its sizes; runs groups consecutive items with one key
    and never more than the limit, and the largest batch header fits the limit."""
    assert split(b"abcdef", [1, 0, 5]) == [b"a", b"", b"bcdef"]
    assert split(b"abc", [3]) == [b"abc"]
    assert [len(r) for r in runs(list(range(10)) + [20] * 3 + [1], lambda x: x >= 10, limit=4)] == [
        4,
        4,
        2,
        3,
        1,
    ]
    assert list(runs([], lambda x: x)) == []
    widest = m.Results(
        "f" * 96,
        [INT_MAX] * BATCH_LIMIT,
        [2**40] * BATCH_LIMIT,
        [m.CANCELLED] * BATCH_LIMIT,
        [1.2345678901234567e-05] * BATCH_LIMIT,
    )
    assert len(encode(widest, b"x")[0]) < MAX_HEADER_LENGTH


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_float_field_is_protocol_error(literal: str) -> None:
    """A float field holding NaN or Infinity (JSON extensions) is refused as bad-field."""
    line = (
        '{"t":"result","len":0,"job":"j","seq":0,"status":"ok","elapsed":%s}' % literal
    ).encode()
    with pytest.raises(ProtocolError) as info:
        parse_header(line)
    assert info.value.code == "bad-field"


@given(
    st.one_of(
        st.lists(st.integers()),
        st.lists(st.text()),
        st.lists(st.floats(allow_nan=False, allow_infinity=False)),
        st.lists(st.one_of(st.integers(), st.booleans(), st.floats())),
    )
)
def test_list_field_text_is_json_dumps(value: list) -> None:
    """A list field's header text is exactly what json.dumps gives, whatever it holds
    (the fast path for lists of one plain type, the encoder for anything else)."""
    from achilles.protocol.framing import _json_value

    try:
        expected = json.dumps(value, separators=(",", ":"))
    except ValueError:
        return
    assert _json_value(value) == expected


@pytest.mark.parametrize(
    "elem, value, plain",
    [
        (int, [1, 2, 3], True),
        (int, [1, True], False),
        (int, [1, 2.0], False),
        (str, ["ok", "error"], True),
        (str, ["ok", "é"], False),
        (str, ["ok", 1], False),
        (float, [0.5, 1.0], True),
        (float, [0.5, float("nan")], False),
        (float, [1], False),
        (int, [], True),
        (int, (1, 2), False),
        (int, [0, INT_MAX], True),
        (int, [0, INT_MAX + 1], False),
        (int, [INT_MIN - 1, 0], False),
    ],
)
def test_plain_list_fast_path(elem: type, value: object, plain: bool) -> None:
    """The fast check of a list field takes only a list of exactly its element type (ASCII
    text, finite floats); anything else goes to the item-by-item path."""
    from achilles.protocol.framing import _plain_list

    assert _plain_list(value, elem) is plain


# --- numbers and texts from peers are bounded (issue 12) ---------------------------------
def test_integers_in_headers_fit_in_64_bits() -> None:
    """Any integer field takes exactly the signed 64-bit range: beyond it (a seq of 4,300
    digits once broke ``achilles status`` for everyone) is bad-field, naming the field."""
    chunk = {"t": "chunk", "len": 0, "job": "j"}
    [frame] = decode_line({**chunk, "seq": INT_MAX})
    assert frame.msg == m.Chunk("j", INT_MAX)
    for seq in (INT_MAX + 1, 10**4299):
        with pytest.raises(ProtocolError) as info:
            decode_line({**chunk, "seq": seq})
        assert info.value.code == "bad-field" and "'seq' is out of range" in info.value.detail
    submit = {
        "t": "submit",
        "len": 0,
        "job": "j",
        "max_attempts": 3,
        "timeout": 0,
        "total": 1,
        "isolated": 0,
        "name": "f",
        "items": -1,
    }
    [frame] = decode_line({**submit, "limit": INT_MIN})
    assert frame.msg.limit == INT_MIN  # type: ignore[attr-defined]
    assert error_code({**submit, "limit": INT_MIN - 1}) == "bad-field"
    assert error_code({"t": "welcome", "digest": "00", "peer_id": 2**64}) == "bad-field"


def test_integers_in_header_lists_fit_in_64_bits() -> None:
    """List fields are bounded the same way, on the fast path and item by item."""
    base = {"t": "chunks", "len": 2, "job": "j"}
    for seqs, sizes in (([0, 2**63], [1, 1]), ([0, 1], [2**64, -(2**64)]), ([0, 2**63], [1, True])):
        line = json.dumps({**base, "seqs": seqs, "sizes": sizes}).encode()
        with pytest.raises(ProtocolError) as info:
            decode_all(line + b"\nab")
        assert info.value.code == "bad-field"


@pytest.mark.parametrize(
    "header",
    [
        {"t": "chunk", "len": 0, "job": "j", "seq": -1},
        {"t": "task", "len": 0, "job": "j", "seq": -1, "timeout": 0},
        {"t": "result", "len": 0, "job": "j", "seq": -5, "status": "ok", "elapsed": 0},
        {"t": "jobfailed", "len": 0, "job": "j", "seq": -2, "reason": "crashed"},
        {"t": "tasks", "len": 0, "job": "j", "seqs": [0, -1], "sizes": [0, 0], "timeout": 0},
        {
            "t": "submit",
            "len": 0,
            "job": "j",
            "max_attempts": 3,
            "timeout": 0,
            "limit": 0,
            "total": -2,
            "isolated": 0,
            "name": "f",
            "items": -1,
        },
    ],
)
def test_chunk_numbers_are_never_negative(header: dict[str, object]) -> None:
    """A sequence number indexes a job's arguments: a negative one (or a total below -1,
    which means unknown) is bad-field."""
    assert error_code(header) == "bad-field"


GOOD_IDS = ["j", "0", "3fa2b1c4d5e6f708192a3b4c5d6e7f80", "17-3fa2b1c4", "a.b_c-D", "x" * 64]
BAD_IDS = ["", "j k", "j\n", "j\x1b[2J", "\u00e9t\u00e9", "a/b", "a\u202eb", "x" * 97]


@pytest.mark.parametrize("job", GOOD_IDS)
def test_safe_job_ids_are_accepted_in_every_frame(job: str) -> None:
    """Job ids of the safe alphabet (a controller's uuid4 hex, the server's ``<owner>-<id>``
    keys) pass in every frame that carries one."""
    for msg in (
        m.Submit(job, 3, 0.0, 0, 1),
        m.Chunk(job, 0),
        m.Cancel(job),
        m.End(job),
        m.Function(job),
        m.Task(job, 0, 0.0),
        m.Result(job, 0, m.OK, 0.0),
        m.JobFailed(job, 0, m.CRASHED),
        m.Chunks(job, [0], [0]),
    ):
        assert decode_all(encode_bytes(msg)) == [Frame(msg)]


@pytest.mark.parametrize("job", BAD_IDS)
def test_unsafe_job_ids_are_refused_in_every_frame(job: str) -> None:
    """A job id with spaces, control characters, non-ASCII, a slash, or over 96
    characters is bad-field wherever it comes (it would reach logs and status as is)."""
    for msg in (
        m.Submit(job, 3, 0.0, 0, 1),
        m.Chunk(job, 0),
        m.Cancel(job),
        m.End(job),
        m.Function(job),
        m.Task(job, 0, 0.0),
        m.Result(job, 0, m.OK, 0.0),
        m.JobFailed(job, 0, m.CRASHED),
        m.Results(job, [0], [0], [m.OK], [0.0]),
    ):
        with pytest.raises(ProtocolError) as info:
            decode_all(encode_bytes(msg))
        assert info.value.code == "bad-field", msg


def test_a_new_jobs_id_is_at_most_64_characters() -> None:
    """A controller's id for a new job is at most 64 characters (the server's key for it,
    which nodes see, adds the owner's number)."""
    assert decode_all(encode_bytes(m.Submit("x" * 64, 3, 0.0, 0, 1)))
    assert decode_all(encode_bytes(m.Cancel("x" * 96)))
    with pytest.raises(ProtocolError, match="at most 64"):
        decode_all(encode_bytes(m.Submit("x" * 65, 3, 0.0, 0, 1)))

"""Fuzzing the C stream pump's chunk framing against httptools (llhttp) as the reference: random chunk sizes (upper
and lower case, zero padded), extensions, trailers, bytes after the end, truncation, splits into reads at random
places (the first piece sometimes as the body that came with the head), and malformed framing. Each input runs
through a real pump on socket pairs (tests/pump_rig.py).

A fixed budget on every CI run (GATEWAY_FUZZ_EXAMPLES inputs per property, 150 by default), in the normal build
and in the sanitizer build (scripts/pump_asan.sh), where a memory error is a crash; a longer run takes a larger
budget. GATEWAY_FUZZ_REPORT=path appends the number of inputs tried per property to that file."""

from __future__ import annotations

import os
import string
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dataplane import _pump
from tests.pump_rig import Reference, Rig

EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
TRIED: dict[str, int] = {}

# RFC 9110 5.6.2 token characters, and what a quoted-string may hold without escapes (5.6.4).
TCHAR = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
QDTEXT = " !#$%&'()*+,-./:;<=>?@[]^_`{|}~" + string.ascii_letters + string.digits


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    path = os.environ.get("GATEWAY_FUZZ_REPORT")
    if path:
        with open(path, "a") as handle:
            for name, count in sorted(TRIED.items()):
                handle.write(f"{name} {count}\n")


def tried(name: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1


@dataclass
class Framed:
    body: bytes     # the chunked body as the replica sends it, bytes after its end included
    end: int | None  # where the message ends (None: truncated, it goes on)


token = st.text(TCHAR, min_size=1, max_size=8)
ext_value = st.one_of(st.none(), token, st.text(QDTEXT, max_size=10).map(lambda t: f'"{t}"'))
extensions = st.lists(st.tuples(token, ext_value), max_size=3).map(
    lambda exts: "".join(f";{n}" if v is None else f";{n}={v}" for n, v in exts).encode())
payload = st.one_of(st.binary(min_size=1, max_size=200), st.integers(1000, 70000).map(lambda n: b"y" * n))


@st.composite
def size_line(draw, n: int) -> bytes:
    digits = format(n, "X" if draw(st.booleans()) else "x")
    return b"0" * draw(st.integers(0, 20)) + digits.encode() + draw(extensions) + b"\r\n"


@st.composite
def framed(draw) -> Framed:
    out = []
    for data in draw(st.lists(payload, max_size=6)):
        out.append(draw(size_line(len(data))) + data + b"\r\n")
    ended = draw(st.integers(0, 9)) > 0
    if ended:
        trailers = draw(st.lists(st.tuples(token, st.text(TCHAR + " ", max_size=20)), max_size=3))
        out.append(draw(size_line(0)) + b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in trailers)
                   + b"\r\n")
    body = b"".join(out)
    end = len(body) if ended else None
    if ended and draw(st.booleans()):
        body += draw(st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"garbage", b"5\r\nhello\r\n"]))
    elif not ended and body and draw(st.booleans()):
        body = body[:draw(st.integers(1, len(body)))]  # cut anywhere
    return Framed(body, end)


@st.composite
def splits(draw, body: bytes) -> list[bytes]:
    """The body as the replica's writes (each read by the pump in one go): random cut points."""
    if not body:
        return []
    cuts = sorted(set(draw(st.lists(st.integers(1, len(body) - 1), max_size=8)) if len(body) > 1 else []))
    bounds = [0, *cuts, len(body)]
    pieces = [body[a:b] for a, b in zip(bounds, bounds[1:])]
    # A single send may be delivered as several reads above a socket buffer: keep pieces within one read.
    out = []
    for piece in pieces:
        out += [piece[i:i + 60000] for i in range(0, len(piece), 60000)]
    return out


def pump_it(pieces: list[bytes], head_piece: bool) -> Rig:
    """Run the pieces through a pump; with head_piece the first one is the body that came with the head."""
    body_so_far = pieces[0] if head_piece and pieces else b""
    rig = Rig(body_so_far=body_so_far)
    if rig.stream is not None:
        rig.feed_reads(pieces[1 if head_piece else 0:])
    return rig


def expect(pieces: list[bytes], head_piece: bool, reference: Reference) -> tuple[bool, int | None, bytes]:
    """What the pump must do according to the reference: (added, end code or None, bytes the client gets)."""
    start = 1 if head_piece and pieces else 0
    offset = 0
    received = b""
    for index, piece in enumerate(pieces):
        stop = offset + len(piece)
        if reference.error_at is not None and reference.error_at < stop:
            return index >= start, _pump.MALFORMED, received
        if reference.end is not None and reference.end <= stop:
            if index < start:
                return False, None, b""
            code = _pump.COMPLETE_EXTRA if stop > reference.end else _pump.COMPLETE
            return True, code, received + piece[:reference.end - offset]
        if index >= start:
            received += piece
        offset = stop
    return True, None, received


def check(pieces: list[bytes], head_piece: bool, reference: Reference) -> Rig:
    added, code, received = expect(pieces, head_piece, reference)
    rig = pump_it(pieces, head_piece)
    try:
        assert (rig.stream is not None) == added, (added, code, reference.end, reference.error_at)
        if added:
            assert rig.code == code, (rig.code, code, reference.end, reference.error_at)
            assert rig.received == received
    finally:
        rig.close()
    return rig


@FUZZ
@given(st.data())
def test_valid_framing_split_anywhere_ends_where_httptools_says(data) -> None:
    tried("valid_framing")
    message = data.draw(framed())
    reference = Reference(message.body)
    assert reference.error_at is None and reference.end == message.end  # the generator makes valid framing
    pieces = data.draw(splits(message.body))
    check(pieces, data.draw(st.booleans()), reference)


MUTATIONS = ["bad_digit", "no_cr", "no_lf", "size_up", "size_down", "no_digits", "data_crlf"]


@FUZZ
@given(st.data())
def test_malformed_framing_is_refused_where_httptools_refuses_it(data) -> None:
    """Structural damage both parsers must see at the same read: a bad size digit, a lost CR or LF, a size that
    does not match the data."""
    tried("malformed_framing")
    chunks = data.draw(st.lists(st.binary(min_size=1, max_size=100), min_size=1, max_size=5))
    victim = data.draw(st.integers(0, len(chunks) - 1))
    kind = data.draw(st.sampled_from(MUTATIONS))
    out = []
    for i, chunk in enumerate(chunks):
        size = format(len(chunk), "x").encode()
        line, tail = size + b"\r\n", b"\r\n"
        if i == victim:
            if kind == "bad_digit":
                line = size[:-1] + data.draw(st.sampled_from([b"g", b"G", b"z", b"x", b"-", b"+", b"!", b"\x00"])) \
                    + b"\r\n"
            elif kind == "no_cr":
                line = size + b"\n"
            elif kind == "no_lf":
                line = size + b"\rX"
            elif kind == "size_up":
                line = format(len(chunk) + data.draw(st.integers(1, 3)), "x").encode() + b"\r\n"
            elif kind == "size_down" and len(chunk) > 1:
                line = format(len(chunk) - 1, "x").encode() + b"\r\n"
            elif kind == "no_digits":
                line = b"\r\n"
            else:
                tail = data.draw(st.sampled_from([b"\n", b"\r", b"XY", b"\r\r"]))
        out.append(line + chunk + tail)
    body = b"".join(out) + b"0\r\n\r\n"
    reference = Reference(body)
    pieces = data.draw(splits(body))
    check(pieces, data.draw(st.booleans()), reference)


@FUZZ
@given(st.data())
def test_random_damage_never_crashes_and_never_forwards_past_the_end(data) -> None:
    """Any byte flipped, inserted or removed: the pump may be more lenient than llhttp (chunk extensions and trailer
    lines are skipped, not validated), but what it forwards is a prefix of what it read, and when both parsers find
    an end, it is the same end."""
    tried("random_damage")
    message = data.draw(framed())
    body = bytearray(message.body)
    for _ in range(data.draw(st.integers(1, 3))):
        if not body:
            break
        at = data.draw(st.integers(0, len(body) - 1))
        kind = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if kind == "flip":
            body[at] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            body[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            del body[at]
    body = bytes(body)
    reference = Reference(body)
    pieces = data.draw(splits(body))
    head_piece = data.draw(st.booleans())
    rig = pump_it(pieces, head_piece)
    try:
        sent = b"".join(pieces[1 if head_piece and pieces else 0:])
        assert sent.startswith(bytes(rig.received))
        if rig.code in (_pump.COMPLETE, _pump.COMPLETE_EXTRA) and reference.error_at is None \
                and reference.end is not None:
            first = len(pieces[0]) if head_piece and pieces else 0
            assert first + len(rig.received) == reference.end
    finally:
        rig.close()

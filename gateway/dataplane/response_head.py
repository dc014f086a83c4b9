"""The replica's response head, as it is passed on to the client: framing read, hop-by-hop removed.

The head is spliced, not rebuilt: header names are matched on the lowered head bytes instead of
per-header httptools callbacks, which is most of a unary request's Python time.
"""

from __future__ import annotations

import re

# Hop-by-hop headers of the replica's response (RFC 9110 §7.6.1): they describe the replica's
# connection, not the client's.
_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"))
# One C-level search over the lowered head instead of a Python loop over the names.
_HOP_BY_HOP_LINE = re.compile(rb"\n(?:" + b"|".join(sorted(_HOP_BY_HOP)) + rb"):")
_CONTENT_LENGTH = re.compile(rb"\ncontent-length:[ \t]*(\d+)[ \t]*\r?\n")

MAX_HEAD_BYTES = 64 * 1024


class Framing:
    """How the response body ends (RFC 9112 §6.3), read from the lowered head."""
    __slots__ = ("chunked", "bodiless", "close_delimited", "has_request_id")

    def __init__(self, lower: bytes, status: int, head_request: bool):
        # find(), not `in`: bytes.__contains__ first tries its argument as an integer and formats the TypeError
        # it clears (CPython 3.11 Objects/bytes_methods.c, _Py_bytes_contains): ~10x the instructions of the search.
        find = lower.find
        self.chunked = find(b"\ntransfer-encoding:") >= 0
        self.bodiless = head_request or status in (204, 304)
        self.close_delimited = not (self.chunked or self.bodiless or find(b"\ncontent-length:") >= 0)
        self.has_request_id = find(b"\nx-request-id:") >= 0


def content_length_of(lower: bytes) -> int:
    """The Content-Length of a lowered head, -1 when it has none (read only on the rare paths)."""
    match = _CONTENT_LENGTH.search(lower)
    return int(match.group(1)) if match is not None else -1


def strip_headers(head: bytes, drop_framing: bool) -> bytes:
    """The head without hop-by-hop headers (and Transfer-Encoding when we de-chunk): the rare path."""
    lines = head.split(b"\r\n")
    kept = [lines[0]]
    for line in lines[1:-1]:
        name = line.split(b":", 1)[0].strip().lower()
        if name in _HOP_BY_HOP or (drop_framing and name == b"transfer-encoding"):
            continue
        kept.append(line)
    kept.append(b"")
    return b"\r\n".join(kept)


def client_head(head: bytes, lower: bytes, dechunk: bool) -> bytes:
    """The head as the client gets it: `head` ends with its last header's CRLF (the relay may add headers)."""
    if dechunk or _HOP_BY_HOP_LINE.search(lower):
        head = strip_headers(head, drop_framing=dechunk)
    if head.startswith(b"HTTP/1.0 "):
        head = b"HTTP/1.1 " + head[9:]  # we speak 1.1 to the client; framing is handled by the caller
    return head


# A last-chunk line (RFC 9112 §7.1: one or more zeros, optional extensions) at a line start.
_LAST_CHUNK = re.compile(rb"(?:\A\n?|\r\n)0+(?:;[^\r\n]*)?\r\n")


def end_of_chunked(data: bytes) -> int:
    """Where a chunked body that ended inside `data` ends (after its last chunk and trailers), or -1.

    Only for the rare path of a replica that wrote more after its response in the same read (the parser
    says the message ended, not where): the payload of an OpenAI stream never holds a bare CRLF (JSON
    escapes it), so the first last-chunk line is the end. When it cannot be found (a last chunk and
    trailers cut over more than the reads kept), the caller fails the exchange rather than relay a
    byte too many. The C pump tracks the framing itself and cuts exactly (pumping.py).
    """
    match = _LAST_CHUNK.search(data)
    if match is None:
        return -1
    start = match.end()
    if data.startswith(b"\r\n", start):
        return start + 2  # no trailers
    end = data.find(b"\r\n\r\n", start)
    return -1 if end < 0 else end + 4

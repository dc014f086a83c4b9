"""Glue between an UpstreamConnection and the C stream pump (_pump.c).

When the pump is built, a chunked body relayed as it is leaves the Python protocol after its
head: the pump reads the replica socket and writes the client socket without a Python call per
chunk, and hands the connection back when the response ends (`_pump_ended`). Everything the
Python side needs to know about a pumped body (its reads, bytes, largest gap, whether the client
blocks it) is read here, so the rest of the data path does not care who moved the bytes.

The pump also follows SSE events (_pump.c, EV_* flags), so two kinds of stream that used to need
Python per read stay in C: the original part of a resumable stream (resume.py: token ids recorded
and, unless the client asked for them, written as null; [DONE], finish_reason, vLLM's in-band
error) and a metered stream (usage.py: the usage chunk read, and dropped when only the gateway
asked for it). What the pump saw goes back to the ResumeStream or the meter when it lets go
(`_pumped_done`). A resumed part goes back to the pump too (EV_RESUMED: the original's id and created, the usage
of an uninterrupted request, for a chat client each completions choice rebuilt as a chat one, written by C as
resume.py's _resumed writes them); only the rewound token of a resume after the last one stays in Python.
"""

from __future__ import annotations

import asyncio
import copy
from typing import TYPE_CHECKING, Any

import orjson

try:
    from gateway.dataplane import _pump
except ImportError:  # installed without a C compiler: every chunk goes through data_received
    _pump = None  # type: ignore[assignment]
PUMP_BUILT = _pump is not None
# A metered stream's pump_mode() (observability/usage.py) as the pump's event flags.
METER_EVENTS = {"strip": _pump.EV_STRIP_USAGE, "count": _pump.EV_ON} if _pump is not None else {}

if TYPE_CHECKING:
    from gateway.dataplane.upstream_events import UpstreamEvents


def start_pump(loop: asyncio.AbstractEventLoop, coalesce_s: float, min_streams: int) -> "_pump.Pump | None":
    """The loop's C stream pump, watched by the loop; None when the extension is not built."""
    if _pump is None:
        return None
    pump = _pump.Pump(coalesce_s, min_streams)
    loop.add_reader(pump.fileno(), pump.run)
    return pump


class PumpedResponses:
    """The pump side of UpstreamConnection (a mixin: the hot path keeps plain attribute reads)."""

    # Provided by UpstreamConnection.
    transport: asyncio.Transport | None
    exchange: "UpstreamEvents | None"
    fd: int
    closed: bool
    reads: int
    bytes_in: int
    max_gap: float
    complete: bool
    keep_alive: bool
    _held_by_client: bool
    _head_keep_alive: bool
    _parser_dechunks: bool | None
    _sink: Any
    streaming: bool
    meter: Any

    pumped: Any = None  # the C pump's handle (_pump.Stream) while it relays this response's body

    @property
    def progress(self) -> int:
        """Reads of the current response so far, the pump's included (the idle timeout watches it move)."""
        pumped = self.pumped
        return self.reads if pumped is None else self.reads + pumped.reads

    @property
    def held_by_client(self) -> bool:
        """The client is not reading: silence is then the client's, not the replica's."""
        pumped = self.pumped
        return self._held_by_client if pumped is None else pumped.blocked

    def start_pump(self, pump: "_pump.Pump", client_fd: int, body_so_far: bytes, events: int = 0) -> bool:
        """Hand the rest of this chunked body to the pump (`events`: a metered stream's flags); False: framing it
        would not follow, or its events need Python (a resumed part's rewound token). A resumable stream's payload
        that came with the head goes to the pump too (False: it is the sink's to flush)."""
        prefix = b""
        if self.streaming:
            sink = self._sink
            events = resume_flags(sink)
            if events < 0:
                return False
            prefix = sink._buffer  # an event the sink had begun: the pump finishes it
            # The payload that came with the head (queued in sink.pending, not flushed) is the pump's too (unsent):
            # its events handled and written by the pump as a later read's are.
            if sink.segment:  # a resumed part: the pump writes the original's id and created, and usage (EV_RESUMED)
                stream = pump.add(self.fd, client_fd, self._pump_ended, body_so_far, events, prefix,
                                  orjson.dumps(sink.ident), orjson.dumps(sink.created), sink.offset, True)
            else:
                # Positional: a keyword argument made PyArg_ParseTupleAndKeywords cost ~3,000 instructions more a
                # stream (callgrind).
                stream = pump.add(self.fd, client_fd, self._pump_ended, body_so_far, events, prefix, b"", b"", 0,
                                  True)
            if stream is not None:
                sink.pending.clear()
        else:
            meter = self.meter
            if meter is not None and events & _pump.EV_STRIP_USAGE:
                prefix = meter.kept_back()  # the start of a chunk split across reads: the pump finishes it
            stream = pump.add(self.fd, client_fd, self._pump_ended, body_so_far, events, prefix)
        if stream is None:
            return False  # httptools goes on deciding
        if prefix:
            if self.streaming:
                self._sink._buffer = b""
            else:
                self.meter.pumping_kept_back()
        self.pumped = stream
        self.transport.pause_reading()  # type: ignore[union-attr]
        return True

    def stop_pump(self) -> None:
        """End pumping without a callback: the exchange is over (client gone, abort, timeout)."""
        stream, self.pumped = self.pumped, None
        if stream is not None:
            stream.cancel()
            self._pumped_done(stream)

    def _pumped_done(self, stream: Any) -> None:
        if self.streaming:
            resume_absorb(self._sink, stream)  # what resume.py needs, should the stream break
            if stream.unmatched and self.exchange is not None:
                self.exchange.state.metrics.pump_unmatched.inc()
        self.reads += stream.reads
        self.bytes_in += stream.bytes_in
        if stream.max_gap > self.max_gap:
            self.max_gap = stream.max_gap
        meter = self.meter
        if meter is not None:
            meter.pumped(stream.usage, stream.events)  # token accounting: what the pump counted (usage.py)
        self._parser_dechunks = None  # httptools stopped mid-message: the next response gets a fresh parser

    def _pump_ended(self, code: int, leftover: bytes | None) -> None:
        stream, self.pumped = self.pumped, None
        if stream is None:
            return
        self._pumped_done(stream)
        exchange = self.exchange
        if exchange is None:
            return
        if leftover:
            exchange.write_through(leftover)  # what the client had not taken yet: it goes before anything else
        if code == _pump.COMPLETE or code == _pump.COMPLETE_EXTRA:
            self.complete = True
            # Bytes after the end of the response: the replica is not speaking HTTP/1.1 properly, do not reuse.
            self.keep_alive = self._head_keep_alive and code == _pump.COMPLETE
            if not self.closed:
                self.transport.resume_reading()  # type: ignore[union-attr]  # idle in the pool: watch for a close
            exchange.upstream_complete()
        elif code == _pump.CLIENT_ERROR:
            exchange.client_write_failed()
        elif code == _pump.BROKEN:
            exchange.upstream_failed("incomplete")  # an in-band error or an early [DONE]: resume.py's _stream_broke
        elif code == _pump.PUMP_ERROR:
            exchange.upstream_failed("pump")  # the pump's own failure (epoll, memory): not the replica's
        else:
            exchange.upstream_failed("malformed" if code == _pump.MALFORMED else "lost")


def resume_flags(resume: Any) -> int:
    """The pump's event flags for a resumable stream (resume.py's ResumeStream); -1: it stays in Python."""
    if resume.broken or resume.done:
        return -1
    flags = _pump.EV_RESUME
    if resume.segment:
        if resume.skip:
            return -1  # the rewound token of a resume after the last one: dropped by Python (one event or two)
        flags |= _pump.EV_RESUMED_CHAT | _pump.EV_RESUMED if resume.chat else _pump.EV_RESUMED
    if not resume.wants_ids:
        flags |= _pump.EV_STRIP_IDS
    if resume.include_usage:
        flags |= _pump.EV_NEED_USAGE
    if resume.finished:
        flags |= _pump.EV_FINISHED
    if resume.usage_sent:
        flags |= _pump.EV_USAGE_SENT
    if resume.ident is None:
        flags |= _pump.EV_FIRST
    if resume.prompt_ids is not None:
        flags |= _pump.EV_PROMPT_KNOWN
    return flags


def resume_as_pumped(resume: Any, stream: Any) -> Any:
    """The ResumeStream as it will be once the pump lets go of `stream`, `resume` left as it is: what a resume would
    start from, asked while the pump still relays (relay.py's migrate decides whether the stream can move)."""
    view = copy.copy(resume)
    view._raw_ids = list(resume._raw_ids)  # the one list resume_absorb changes in place
    resume_absorb(view, stream)
    return view


def resume_absorb(resume: Any, stream: Any) -> None:
    """What the pump saw of a resumable stream, back in its ResumeStream (the ids are parsed only to resume)."""
    if stream.token_ids:
        resume._raw_ids.append(stream.token_ids)
    if resume.prompt_ids is None and stream.prompt_token_ids is not None:
        resume.prompt_ids = orjson.loads(b"[" + stream.prompt_token_ids + b"]")
    if resume.first_event is None and resume._ident is None:  # read only when asked for (ResumeStream.ident)
        resume.first_event = stream.first_event
    resume.finished = resume.finished or stream.finished
    resume.usage_sent = resume.usage_sent or stream.usage_sent
    resume.no_ids = resume.no_ids or stream.no_ids
    resume.done = resume.done or stream.done_sent
    resume.last_sent = resume.last_sent or stream.last_sent
    resume.broken = resume.broken or stream.broken

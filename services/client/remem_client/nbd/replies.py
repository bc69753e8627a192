"""NBD replies: packed with one struct call each, written in as few transport writes as possible.

One `ReplyWriter` per connection. Each reply is packed with one struct call (simple replies,
or structured ones once NBD_OPT_STRUCTURED_REPLY was negotiated: the spec then requires a
structured reply to every READ and prefers one for errors, which carry a message). Replies
produced while the connection handles one socket callback (`batching`) are collected and
written together when it ends; a reply produced outside one (a suspended request that
finished) is written when the callback that finished it ends (a page server link's reply
callback, `inline.CallbackEnd`), or else on the next loop turn, so replies finishing
together still share a write. How the parts go out: small parts (below `JOIN_MAX`) are joined into
one buffer, big READ payloads are passed as they are, and where the loop does
scatter/gather (uvloop's `writelines` hands every buffer to one writev; asyncio's, in 3.11,
joins them) everything goes to one `writelines`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from remem_client.inline import callback_end
from remem_client.nbd import wire

if TYPE_CHECKING:
    import asyncio

JOIN_MAX = 64 * 1024  # reply parts below this are joined into one transport write

_pack_simple = wire.SIMPLE_REPLY.pack
_pack_read = wire.STRUCTURED_READ.pack
_pack_chunk = wire.STRUCTURED_REPLY.pack
_pack_error = wire.ERROR_PAYLOAD.pack
_SIMPLE_MAGIC = wire.SIMPLE_REPLY_MAGIC
_STRUCTURED_MAGIC = wire.STRUCTURED_REPLY_MAGIC
_DONE = wire.REPLY_FLAG_DONE
_OFFSET_DATA = wire.REPLY_TYPE_OFFSET_DATA
_OFFSET_SIZE = wire.OFFSET.size
_TYPE_ERROR = wire.REPLY_TYPE_ERROR
_TYPE_NONE = wire.REPLY_TYPE_NONE

Part = bytes | bytearray | memoryview


class ReplyWriter:
    """Packs one connection's replies and writes them in as few transport writes as it can.

    `transport` is set once the connection is made; `structured` once the handshake is
    done; `batching` while the connection handles a socket callback (it calls `flush` at
    the end); `closed` once nothing more may be sent (replies are then dropped).
    """

    __slots__ = (
        "_big",
        "_end",
        "_out",
        "_scheduled",
        "batching",
        "closed",
        "scatter_gather",
        "structured",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, scatter_gather: bool) -> None:
        self._end = callback_end(loop)
        self.scatter_gather = scatter_gather
        self.transport: asyncio.Transport | None = None
        self.structured = False
        self.batching = False
        self.closed = False
        self._out: list[Part] = []
        self._big = False  # a part of JOIN_MAX or more is in _out
        self._scheduled = False  # a flush is deferred (`CallbackEnd.defer`)

    def ok(self, handle: int) -> None:
        """A simple success reply (every command but a READ under structured replies)."""
        if self.closed:
            return
        self._out.append(_pack_simple(_SIMPLE_MAGIC, 0, handle))
        if not self.batching and not self._scheduled:
            self._scheduled = True
            self._end.defer(self.flush)

    def read(self, handle: int, offset: int, data: Part) -> None:
        """A successful READ of `offset`: header, then `data` as it is (never copied here)."""
        if self.closed:
            return
        length = len(data)
        if self.structured:
            header = _pack_read(
                _STRUCTURED_MAGIC, _DONE, _OFFSET_DATA, handle, length + _OFFSET_SIZE, offset
            )
        else:
            header = _pack_simple(_SIMPLE_MAGIC, 0, handle)
        out = self._out
        out.append(header)
        out.append(data)
        if length >= JOIN_MAX:
            self._big = True
        if not self.batching and not self._scheduled:
            self._scheduled = True
            self._end.defer(self.flush)

    def empty_read(self, handle: int) -> None:
        """A successful READ of 0 bytes (structured: one NONE chunk, as the spec wants)."""
        if self.structured:
            self._emit(_pack_chunk(_STRUCTURED_MAGIC, _DONE, _TYPE_NONE, handle, 0))
        else:
            self.ok(handle)

    def error(self, handle: int, error: int, text: bytes) -> None:
        """An error reply with NBD errno `error`; structured ones carry `text` as message."""
        if self.structured:
            payload = _pack_error(error, len(text)) + text
            self._emit(
                _pack_chunk(_STRUCTURED_MAGIC, _DONE, _TYPE_ERROR, handle, len(payload)) + payload
            )
        else:
            self._emit(_pack_simple(_SIMPLE_MAGIC, error, handle))

    def _emit(self, part: Part) -> None:
        if self.closed:
            return
        self._out.append(part)
        if not self.batching and not self._scheduled:
            self._scheduled = True
            self._end.defer(self.flush)

    def flush(self) -> None:
        """Write the replies collected so far with as few transport writes as possible."""
        self._scheduled = False
        out = self._out
        if not out:
            return
        self._out = []
        big = self._big
        self._big = False
        transport = self.transport
        if self.closed or transport is None:
            return
        if len(out) == 1:
            transport.write(out[0])
        elif self.scatter_gather:
            transport.writelines(out)
        elif not big:
            transport.write(b"".join(out))
        else:
            small: list[Part] = []
            for part in out:
                if len(part) < JOIN_MAX:
                    small.append(part)
                    continue
                if small:
                    transport.write(b"".join(small))
                    small = []
                transport.write(part)
            if small:
                transport.write(b"".join(small))

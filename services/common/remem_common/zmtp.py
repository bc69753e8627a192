"""ZMTP 3.0, ZeroMQ's wire protocol: the codec both ends of remem's in-loop links share.

The client's DEALER (`remem_client.zmtp.ZmtpDealer`) and the page server's ROUTER
(`remem_pageserver.zmtp_router.ZmtpRouter`) speak it without libzmq on plaintext links; each
peer may as well be a libzmq socket (RFC 23/ZMTP 3.0; libzmq answers a 3.0 greeting in 3.0):

- greeting, 64 bytes each way: 0xFF, 8 bytes of padding, 0x7F, version 3.0, mechanism
  "NULL" padded to 20 bytes, as-server 0, 31 bytes of filler;
- handshake: each side sends a READY command, whose metadata names its Socket-Type (and,
  for a DEALER or REQ that set one, its Identity: the routing id a ROUTER gives it);
- then frames: a flags byte (MORE 1, LONG 2, COMMAND 4), the size in 1 byte (or 8, big-endian,
  with LONG), the body. A message is frames up to one without MORE. ZMTP 3.1's PING (a
  libzmq peer with heartbeats on sends it whatever version we speak) is answered with PONG.

Only the NULL security mechanism is spoken: Curve links keep using libzmq.

Received frames are memoryviews into the receive buffer, never copied (see `FrameReader`).
Sent frames are never copied either: `zmtp_buffers` gives header and body buffers for one
gathered write.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

GREETING = (
    b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
)
GREETING_BYTES = 64
_MORE, _LONG, _COMMAND = 1, 2, 4
_SIZE8 = struct.Struct(">Q")
_PROPERTY_SIZE = struct.Struct(">I")
# Frames above this are a protocol violation: the largest remem message is a 1024-page GET
# reply (4 MiB of data).
MAX_FRAME = 64 << 20
# Fresh receive buffers are this large, or larger for a bigger frame.
RX_CHUNK = 256 << 10
# A reader that reuses its buffer keeps one grown for a large frame up to this size; past it
# the buffer goes back to RX_CHUNK once empty (a 4 MiB batch is the largest remem sends).
# One that does not takes a buffer this large for a large frame, room for the next ones.
KEEP_BUFFER = 8 << 20
# ... for this many frames of that size (see FrameReader).
LARGE_FRAMES_PER_BUFFER = 4
# A reader that reuses its buffer reads at most this much at a time, unless the rest of a
# frame begun: what of a large frame's body may land before its header is parsed, and be
# moved if the frame does not fit where it began.
READ_CAP = 32 << 10
_SHORT_HEADERS = [bytes([flags, size]) for flags in (0, _MORE) for size in range(256)]
# The send buffer both ends ask for on a Unix socket (the kernel caps it at
# net.core.wmem_max, 4 MiB on the machines remem is measured on; 208 KiB by default): a
# 4 MiB message crossed the default buffer in ~19 pieces, each waking both ends. TCP keeps
# the kernel's autotuning, which a fixed SO_SNDBUF would turn off.
UNIX_SEND_BUFFER = 4 << 20


def enlarge_unix_send_buffer(sock: Any) -> None:
    """Ask for UNIX_SEND_BUFFER on `sock` if it is a Unix socket (a socket.socket or an
    event loop's transport socket); a refusal only leaves it slower, so it is not raised."""
    if sock is None or sock.family != socket.AF_UNIX:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)


class ZmtpError(Exception):
    """The peer broke ZMTP (bad greeting, handshake or frame); the connection is dropped."""


def command_frame(name: bytes, data: bytes = b"") -> bytes:
    """A command frame: the name's length and name, then the command's data."""
    body = bytes([len(name)]) + name + data
    if len(body) < 256:
        return bytes([_COMMAND, len(body)]) + body
    return bytes([_COMMAND | _LONG]) + _SIZE8.pack(len(body)) + body


def ready_command(socket_type: bytes, identity: bytes | None = None) -> bytes:
    """A READY command frame naming our socket type (and routing id, if given)."""
    properties = b"\x0bSocket-Type" + _PROPERTY_SIZE.pack(len(socket_type)) + socket_type
    if identity is not None:
        properties += b"\x08Identity" + _PROPERTY_SIZE.pack(len(identity)) + identity
    return command_frame(b"READY", properties)


def pong_command(ping: dict[bytes, bytes]) -> bytes:
    """The PONG answering a PING (as `parse_command` returned it): its context echoed."""
    return command_frame(b"PONG", ping.get(b"context", b""))


def check_greeting(greeting: memoryview) -> None:
    """Raise ZmtpError unless `greeting` is a ZMTP 3.x greeting of the NULL mechanism."""
    if greeting[0] != 0xFF or greeting[9] & 1 != 1:
        raise ZmtpError("not a ZMTP 3 greeting (bad signature)")
    if greeting[10] < 3:
        raise ZmtpError(f"ZMTP version {greeting[10]}.{greeting[11]}, 3 or later needed")
    mechanism = bytes(greeting[12:32]).rstrip(b"\0")
    if mechanism != b"NULL":
        raise ZmtpError(f"security mechanism {mechanism!r}; only NULL is spoken here")


def parse_command(body: memoryview) -> tuple[bytes, dict[bytes, bytes]]:
    """(name, properties) of a command frame: READY's metadata (names lower-cased), PING's
    `ttl` and `context`; nothing for other commands."""
    if not body.nbytes or body[0] + 1 > body.nbytes:
        raise ZmtpError("truncated command")
    name = bytes(body[1 : 1 + body[0]])
    properties: dict[bytes, bytes] = {}
    at = 1 + body[0]
    if name == b"PING":
        if body.nbytes < at + 2:
            raise ZmtpError("truncated PING")
        return name, {b"ttl": bytes(body[at : at + 2]), b"context": bytes(body[at + 2 :])}
    if name != b"READY":
        return name, properties
    while at < body.nbytes:
        key_size = body[at]
        if at + 1 + key_size + 4 > body.nbytes:
            raise ZmtpError("truncated READY property")
        key = bytes(body[at + 1 : at + 1 + key_size]).lower()
        at += 1 + key_size
        (value_size,) = _PROPERTY_SIZE.unpack_from(body, at)
        at += 4
        if at + value_size > body.nbytes:
            raise ZmtpError("truncated READY property value")
        properties[key] = bytes(body[at : at + value_size])
        at += value_size
    return name, properties


def zmtp_buffers(frames: Sequence[Any]) -> list[Any]:
    """Header and body buffers of one message, for `writelines` (bodies are not copied)."""
    out: list[Any] = []
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        if isinstance(frame, bytes):
            body: Any = frame
        else:
            view = memoryview(frame)
            # A strided view (never made on the hot path) is sent as a contiguous copy.
            body = (view if view.c_contiguous else memoryview(bytes(view))).cast("B")
        size = len(body)
        more = _MORE if index < last else 0
        if size < 256:
            out.append(_SHORT_HEADERS[256 * more + size])
        else:
            out.append(bytes([more | _LONG]) + _SIZE8.pack(size))
        if size:
            out.append(body)
    return out


class FrameReader:
    """Incremental ZMTP parser over buffers it hands to the socket to fill.

    Use: `buffer()` for the next read, `advance(n)` once n bytes landed there; `advance`
    returns the messages completed (lists of memoryviews). Commands go to `on_command`.

    Frames point into the receive buffer. By default a buffer is not reused once filled (a
    new one is taken instead), so frames stay valid for as long as their holder keeps them.
    A frame that does not fit in what is left of the buffer is moved, with the bytes of it
    received so far (a read's worth at most), to a new buffer; one made for a large frame
    has room for LARGE_FRAMES_PER_BUFFER of them (KEEP_BUFFER bytes at most), so a stream
    of 1 MiB replies moves part of one in four instead of part of each.

    With `reuse`, the caller promises to be done with the messages `advance` returned before
    it asks for the next `buffer()`, and one buffer serves every read: from its start again
    whenever all it held was handed out (it stays in the CPU's cache and costs no
    allocation). A read takes at most READ_CAP bytes, except the rest of a frame whose size
    is known, which it takes up to that frame's end: so a large frame's body lands where its
    header said, and a message that does not fit in what is left of the buffer is moved to
    its start with at most READ_CAP bytes of its body (the buffer grows for a larger one).
    """

    def __init__(
        self, on_command: Callable[[bytes, dict[bytes, bytes]], None], *, reuse: bool = False
    ) -> None:
        self._on_command = on_command
        self._reuse = reuse
        self._buf = np.empty(RX_CHUNK, dtype=np.uint8)  # uninitialised: no memset
        self._view: memoryview = self._buf.data
        self._start = 0  # first byte not yet parsed
        self._end = 0  # first byte not yet filled
        self._greeted = False
        self._frames: list[memoryview] = []
        # Bytes the frame being received needs (from its header on; with `reuse`, from its
        # message's first frame on), once it cannot fit in what is left of the buffer; the
        # next `buffer()` makes room (not `advance`: the messages it returns may still point
        # into the buffer).
        self._need = 0
        self._message_start = 0  # with `reuse`: where the message being received begins
        self._frame_left = 0  # with `reuse`: bytes still to come of a frame begun

    def buffer(self) -> memoryview:
        if self._need:
            need, self._need = self._need, 0
            self._renew(need)
        elif self._reuse and self._start == self._end and not self._frames:
            # Everything read was handed out and is done with: fill from the start again.
            self._start = self._end = 0
            if len(self._view) > KEEP_BUFFER:
                self._buf = np.empty(RX_CHUNK, dtype=np.uint8)
                self._view = self._buf.data
        elif self._end == len(self._view):
            self._renew(self._end - self._kept() + READ_CAP if self._reuse else RX_CHUNK)
        if self._reuse:
            return self._view[self._end : self._end + max(self._frame_left, READ_CAP)]
        return self._view[self._end :]

    def _kept(self) -> int:
        """With `reuse`: where the bytes still needed begin (the message being received)."""
        return self._message_start if self._frames else self._start

    def _renew(self, need: int) -> None:
        """Make room: move what is still needed to the start of a buffer of at least `need`
        bytes. Without `reuse` that buffer is a fresh one, so the old one stays whole for
        the frames that point into it; with it, this one if large enough, the frames of the
        message being received then parsed again where they landed."""
        if self._reuse:
            kept = self._kept()
            size = self._end - kept
            if need <= len(self._view):
                self._buf[:size] = self._buf[kept : self._end]  # overlap-safe
            else:
                buf = np.empty(need + RX_CHUNK, dtype=np.uint8)
                buf[:size] = self._buf[kept : self._end]
                self._buf, self._view = buf, buf.data
            self._start, self._end, self._message_start = 0, size, 0
            self._frames = []
            return
        tail = self._view[self._start : self._end]
        size = (
            max(need, min(need * LARGE_FRAMES_PER_BUFFER, KEEP_BUFFER))
            if need > RX_CHUNK
            else RX_CHUNK
        )
        buf = np.empty(size, dtype=np.uint8)
        view: memoryview = buf.data
        view[: tail.nbytes] = tail
        self._buf, self._view = buf, view
        self._start, self._end = 0, tail.nbytes

    def advance(self, nbytes: int) -> list[list[memoryview]]:
        self._end += nbytes
        self._frame_left = 0
        messages: list[list[memoryview]] = []
        view = self._view
        while True:
            start, end = self._start, self._end
            if not self._greeted:
                if end - start < GREETING_BYTES:
                    return messages
                check_greeting(view[start : start + GREETING_BYTES])
                self._greeted = True
                self._start = start + GREETING_BYTES
                continue
            if end - start < 2:
                break
            if not self._frames:
                self._message_start = start
            flags = view[start]
            if flags & ~(_MORE | _LONG | _COMMAND):
                raise ZmtpError(f"frame flags {flags:#x} has reserved bits set")
            if flags & _LONG:
                if end - start < 9:
                    break
                (size,) = _SIZE8.unpack_from(view, start + 1)
                body_at = start + 9
            else:
                size = view[start + 1]
                body_at = start + 2
            if size > MAX_FRAME:
                raise ZmtpError(f"frame of {size} bytes, {MAX_FRAME} at most")
            if end - body_at < size:
                self._frame_left = body_at + size - end
                if body_at + size > len(view):
                    # The frame does not fit in what is left of this buffer: a buffer with
                    # room for it takes the next read, so even a 4 MiB frame is not copied.
                    self._need = body_at + size - (self._kept() if self._reuse else start)
                break
            body = view[body_at : body_at + size]
            self._start = body_at + size
            if flags & _COMMAND:
                self._on_command(*parse_command(body))
                continue
            self._frames.append(body)
            if not flags & _MORE:
                messages.append(self._frames)
                self._frames = []
        return messages


__all__ = [
    "GREETING",
    "GREETING_BYTES",
    "MAX_FRAME",
    "RX_CHUNK",
    "UNIX_SEND_BUFFER",
    "FrameReader",
    "ZmtpError",
    "check_greeting",
    "command_frame",
    "enlarge_unix_send_buffer",
    "parse_command",
    "pong_command",
    "ready_command",
    "zmtp_buffers",
]
